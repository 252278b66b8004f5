"""The backend protocol and its Triton implementation (the only tritonclient user at run time)."""
