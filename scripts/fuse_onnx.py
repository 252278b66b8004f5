"""Fuses a BERT-like encoder's ONNX graph for ONNX Runtime on the CPU (`make models`).

    python scripts/fuse_onnx.py --builtin minilm        # what `make models` runs
    python scripts/fuse_onnx.py --plain model.onnx --out model_fused.onnx --hf-folder FOLDER

ONNX Runtime's transformer optimizer (onnxruntime.transformers, made for this job) rewrites
the exported graph into its fused CPU kernels: one EmbedLayerNormalization, one Attention
per layer (Q, K, V projections, softmax and the mask in one kernel), SkipLayerNormalization
and BiasGelu. Fewer, larger kernels mean fewer passes over memory and fewer thread-pool
dispatches per execution, which counts most at the small batches single-sentence calls make.

The fused graph uses com.microsoft contrib ops that only ONNX Runtime runs: TensorRT
(`make engines`) keeps building from the plain graph, and the plain graph stays the
reference. Before anything is written in place the fused graph is checked against the plain
one on token batches of several shapes; a graph that differs is not written.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Every op the fusion must produce for a BERT encoder: without them the rewrite missed the
# model's pattern and the "fused" graph would just be the plain one (or worse, half-fused).
REQUIRED_FUSIONS = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization")
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4


def fuse(plain: Path, out: Path, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Writes the fused graph to `out` (atomically) after checking it; returns fused op counts."""
    from onnxruntime.transformers import optimizer

    # opt_level 0: only the transformer fusions here; ONNX Runtime applies its own graph
    # optimizations when the session loads, on this machine's CPU.
    model = optimizer.optimize_model(str(plain), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    missing = [op for op in REQUIRED_FUSIONS if not counts.get(op)]
    if missing:
        raise SystemExit(f"{plain}: the transformer optimizer fused no {', '.join(missing)}; the graph is not a BERT encoder it knows")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        model.save_model_to_file(str(staged))
        check(plain, staged)
        staged.replace(out)
    return counts


def check(plain: Path, fused: Path) -> None:
    """The fused graph's outputs equal the plain graph's on random token batches (padded rows too)."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (plain, fused)]
    rng = np.random.default_rng(13)
    for rows, width in ((1, 16), (7, 32), (32, 16), (3, 128)):
        ids = rng.integers(1000, 20000, (rows, width)).astype(np.int64)
        mask = np.ones((rows, width), dtype=np.int64)
        for row in range(rows):  # varied real lengths: the mask must be honoured exactly
            mask[row, rng.integers(2, width + 1):] = 0
        feed = {"input_ids": ids, "attention_mask": mask}
        want, got = (s.run(None, feed)[0] for s in sessions)
        cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
        diff = float(np.abs(want - got).max())
        if cosine.min() < MIN_COSINE or diff > MAX_ABS_DIFF:
            raise SystemExit(
                f"fused graph differs from {plain} on {rows}x{width} tokens (min cosine {cosine.min():.7f}, "
                f"max abs diff {diff:.2e}); not written"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builtin", help="a built-in model (models/builtin.py, BUILTIN): its files are found in model_repository")
    parser.add_argument("--plain", type=Path, help="the exported graph (scripts/export_encoder.py)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hf-folder", type=Path, help="the model's folder (config.json: heads, hidden size)")
    args = parser.parse_args()
    if args.builtin:
        from ragserve_server.models.builtin import BUILTIN
        from ragserve_server.models.registry import DEFAULT_REPOSITORY, ONNXRUNTIME

        spec = BUILTIN[args.builtin]()
        folder = DEFAULT_REPOSITORY / spec.triton_model / "1"
        args.plain, args.out, args.hf_folder = folder / "model.onnx", folder / spec.parameters[ONNXRUNTIME]["small_batch_onnx_file"], spec.tokenizer_dir
    elif not (args.plain and args.out and args.hf_folder):
        parser.error("give --builtin, or all of --plain, --out and --hf-folder")
    config = json.loads((args.hf_folder / "config.json").read_text())
    counts = fuse(args.plain, args.out, num_heads=int(config["num_attention_heads"]), hidden_size=int(config["hidden_size"]))
    print(f"fused {args.plain} -> {args.out}: {counts}")


if __name__ == "__main__":
    main()
