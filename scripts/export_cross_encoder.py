"""Exports a Hugging Face cross-encoder (AutoModelForSequenceClassification, one logit) to a
Triton model repository entry that the gateway serves with `--cross-encoders NAME=OUT`.

    python scripts/export_cross_encoder.py --hf-folder ~/ms-marco-MiniLM-L-6-v2 --out model_repository/msmarco-minilm

Writes OUT/ragserve.json (the model's registry entry: server/ragserve_server/models/registry.py),
OUT/config.pbtxt (rendered from that entry for the CPU), OUT/1/model.onnx (token tensors
in, `logits` [1] out), OUT/1/model.py (ONNX Runtime, scripts/templates/ort_model.py) and
OUT/hf/ (tokenizer, config and weights: the gateway tokenizes with it, the GPU variant runs
it with PyTorch). The Triton model name is OUT's folder name. The ONNX graph is checked
against PyTorch on a few pairs before anything is written in place.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from ragserve_server.models.catalog import max_tokens_of
from ragserve_server.models.model_config import TensorSpec
from ragserve_server.models.registry import CROSS_ENCODER, encoder_spec
from ragserve_server.models.repository import publish_export

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_common import TEMPLATE, fast_tokenizer, staging_folder  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Pairs the exported graph is checked on: short, long-ish, and an empty document.
CHECK_PAIRS = [
    ("what is the capital of france?", "Paris is the capital and largest city of France."),
    ("how do vaccines work", "Vaccines train the immune system to recognise a pathogen " * 6),
    ("empty document", ""),
]

class LogitsOnly(torch.nn.Module):
    """The classifier with a fixed signature; token_type_ids is ignored by models without it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.uses_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.uses_types else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def export(hf_folder: Path, out: Path, *, max_batch: int = 64, cores: int = 2) -> None:
    config = AutoConfig.from_pretrained(hf_folder)
    if config.num_labels != 1:
        raise SystemExit(
            f"{hf_folder}: the classifier has {config.num_labels} labels; a cross-encoder with a single "
            f"relevance logit (num_labels=1) is required"
        )
    tokenizer = fast_tokenizer(hf_folder)
    model = LogitsOnly(
        AutoModelForSequenceClassification.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")
    ).eval()

    # Build next to OUT, then swap in: a half-exported folder never looks built.
    out = out.resolve()
    with staging_folder(out) as staging:
        (staging / "1").mkdir()
        hf_dir = staging / "hf"
        tokenizer.save_pretrained(hf_dir)
        model.model.save_pretrained(hf_dir)  # config (token limit) and weights (the PyTorch GPU variant)
        max_tokens = max_tokens_of(hf_dir)

        sample = tokenizer(["a", "b"], ["c d", "e"], padding=True, return_tensors="pt")
        example = tuple(sample.get(name, torch.zeros_like(sample["input_ids"])) for name in INPUTS)
        dynamic = {name: {0: "batch", 1: "seq"} for name in INPUTS}
        dynamic["logits"] = {0: "batch"}
        with torch.no_grad():
            torch.onnx.export(
                model,
                example,
                str(staging / "1" / "model.onnx"),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,
            )
        check(model, tokenizer, staging / "1" / "model.onnx", max_tokens)

        shutil.copy2(TEMPLATE, staging / "1" / "model.py")
        spec = encoder_spec(
            name=out.name,
            kind=CROSS_ENCODER,
            triton_model=out.name,
            tokenizer_dir=hf_dir,
            max_input_tokens=max_tokens,
            output=TensorSpec("logits", "TYPE_FP32", (1,), comment="relevance logit; the gateway applies the sigmoid"),
            max_batch=max_batch,
            token_types=True,
            onnx_built_by=f"scripts/export_cross_encoder.py --hf-folder {hf_folder.resolve()} --out {out}",
            cores=cores,
            description=f"cross-encoder exported from {hf_folder.resolve().name}: (query, document) tokens in, one logit out",
        )
        publish_export(spec, staging, out)
    print(f"exported {hf_folder} -> {out} (Triton model {out.name!r}, max {max_tokens} tokens)")


def check(model: torch.nn.Module, tokenizer, onnx_path: Path, max_tokens: int) -> None:
    """ONNX Runtime must give PyTorch's logits (padding included) before the export is kept."""
    queries, documents = zip(*CHECK_PAIRS)
    batch = tokenizer(list(queries), list(documents), padding=True, truncation="only_second", max_length=max_tokens, return_tensors="np")
    feed = {name: batch.get(name, np.zeros_like(batch["input_ids"])).astype(np.int64) for name in INPUTS}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}
    (got,) = session.run(["logits"], {k: v for k, v in feed.items() if k in graph_inputs})
    with torch.no_grad():
        want = model(*(torch.from_numpy(feed[name]) for name in INPUTS)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise SystemExit(f"ONNX export differs from PyTorch by {diff:.2e} on the check pairs; not exported")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-folder", type=Path, required=True, help="AutoModelForSequenceClassification checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="model repository entry to write (its name = Triton model name)")
    parser.add_argument("--name", help="Triton model name; must equal OUT's folder name (default: it)")
    parser.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size: rows per Triton request")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the model may use: that many Triton instances (registry.FEW_ROWS_MAX_ROWS)")
    args = parser.parse_args()
    if args.name and args.name != args.out.name:
        parser.error(f"--name {args.name!r} must equal the folder name of --out ({args.out.name!r}): Triton names models by folder")
    export(args.hf_folder, args.out, max_batch=args.max_batch, cores=args.cores)


if __name__ == "__main__":
    main()
