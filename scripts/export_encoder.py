"""Exports a Hugging Face sentence-embedding model (BERT-like, mean pooling) to a Triton model
repository entry that the gateway serves with `--embedding-models NAME=OUT`.

    python scripts/export_encoder.py --hf-folder ~/bge-small-en-v1.5 --out model_repository/bge-small

Writes OUT/ragserve.json (the model's registry entry: server/ragserve_server/models/registry.py),
OUT/config.pbtxt (rendered from it for the CPU), OUT/1/model.onnx (token tensors in, the
mean-pooled, unnormalised embedding out: the gateway normalises and cuts `dimensions`),
OUT/1/model.py (ONNX Runtime, scripts/templates/ort_model.py) and OUT/hf/ (tokenizer, config
and weights). The token limit and the query/passage prompts come from the folder's
sentence-transformers files where it has them. The ONNX graph is checked against PyTorch
before anything is written in place. `make models` uses `export_onnx` for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel, AutoTokenizer

TEMPLATE = Path(__file__).resolve().parent / "templates" / "ort_model.py"
CHECK_TEXTS = ["what is the capital of france?", "Paris is the capital and largest city of France. " * 8, "a"]


class MeanPooledEncoder(torch.nn.Module):
    """Token tensors in, attention-masked mean of the last hidden state out (not normalised)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load(hf_folder: Path) -> MeanPooledEncoder:
    return MeanPooledEncoder(AutoModel.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")).eval()


def export_onnx(model: MeanPooledEncoder, out: Path) -> None:
    """Writes the graph with dynamic batch and sequence axes, atomically."""
    ids = torch.ones(2, 8, dtype=torch.int64)
    mask = torch.ones(2, 8, dtype=torch.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(tmp),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(out)  # a half-written file never looks built


def check(model: MeanPooledEncoder, tokenizer, onnx_path: Path, max_tokens: int) -> None:
    batch = tokenizer(CHECK_TEXTS, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    feed = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(["embedding"], feed)
    with torch.no_grad():
        want = model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise SystemExit(f"ONNX export differs from PyTorch by {diff:.2e} on the check texts; not exported")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def export(hf_folder: Path, out: Path, *, name: str, max_batch: int = 64, cores: int = 2) -> None:
    from ragserve_server.models.catalog import max_tokens_of
    from ragserve_server.models.model_config import TensorSpec
    from ragserve_server.models.registry import EMBEDDING, encoder_spec
    from ragserve_server.models.repository import publish_export

    hf_folder = hf_folder.resolve()
    tokenizer = AutoTokenizer.from_pretrained(hf_folder, use_fast=True)
    if not tokenizer.is_fast:
        raise SystemExit(f"{hf_folder}: no fast tokenizer (tokenizer.json) could be built for this model")
    model = load(hf_folder)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_dir = staging / "hf"
        tokenizer.save_pretrained(hf_dir)
        model.encoder.save_pretrained(hf_dir)
        for extra in ("sentence_bert_config.json", "config_sentence_transformers.json"):
            if (hf_folder / extra).exists():
                shutil.copy2(hf_folder / extra, hf_dir / extra)
        declared = _json(hf_dir / "sentence_bert_config.json").get("max_seq_length")
        max_tokens = int(declared) if declared else max_tokens_of(hf_dir)
        prompts = _json(hf_dir / "config_sentence_transformers.json").get("prompts", {})
        export_onnx(model, staging / "1" / "model.onnx")
        check(model, tokenizer, staging / "1" / "model.onnx", max_tokens)
        shutil.copy2(TEMPLATE, staging / "1" / "model.py")
        hidden = int(model.encoder.config.hidden_size)
        spec = encoder_spec(
            name=name,
            kind=EMBEDDING,
            triton_model=out.name,
            tokenizer_dir=hf_dir,
            max_input_tokens=max_tokens,
            output=TensorSpec("embedding", "TYPE_FP32", (hidden,), comment="mean-pooled, not normalised"),
            max_batch=max_batch,
            dimensions=hidden,
            prefixes={k: v for k, v in prompts.items() if k in ("query", "passage") and v},
            onnx_built_by=f"scripts/export_encoder.py --hf-folder {hf_folder} --out {out}",
            cores=cores,
            description=f"embedding model exported from {hf_folder.name}: token tensors in, mean-pooled embedding out",
        )
        publish_export(spec, staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {hf_folder} -> {out} (Triton model {out.name!r}, {hidden} dimensions, max {max_tokens} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-folder", type=Path, required=True, help="a Hugging Face encoder folder (AutoModel)")
    parser.add_argument("--out", type=Path, required=True, help="model repository entry to write (its name = Triton model name)")
    parser.add_argument("--name", help="public model name (default: OUT's folder name)")
    parser.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size: rows per Triton request")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the model may use: that many Triton instances (registry.FEW_ROWS_MAX_ROWS)")
    args = parser.parse_args()
    export(args.hf_folder, args.out, name=args.name or args.out.name, max_batch=args.max_batch, cores=args.cores)


if __name__ == "__main__":
    main()
