"""Where the checkout is: the gateway finds the model repository and scripts beside it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
