"""Exports a SPLADE-style sparse encoder from a masked-LM folder (AutoModelForMaskedLM).

    python scripts/export_sparse.py --hf-folder ~/splade-v3 --out model_repository/splade

The graph takes token tensors and returns `sparse_embedding` (rows, vocabulary): per vocabulary
entry, the max over the input's real tokens of log(1 + ReLU(MLM logit)), as SPLADE computes it
(special tokens included, padding masked out). The gateway keeps the non-zero weights (or the
request's top-k / those over its threshold) and Embed returns index/weight pairs; serve it with
`--embedding-models NAME=OUT`. The ONNX graph is checked against PyTorch before anything is
written in place.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_common import TEMPLATE, check_graph, declared_max_tokens, export_token_graph, fast_tokenizer, staging_folder  # noqa: E402


class SpladeEncoder(torch.nn.Module):
    """Token tensors in, max over real tokens of log(1 + ReLU(logits)) out (rows, vocabulary)."""

    def __init__(self, mlm: torch.nn.Module) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.mlm(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).logits
        # Weights are >= 0, so zeroing padding positions leaves the max over real tokens.
        weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
        return weights.max(dim=1).values


def load(hf_folder: Path) -> SpladeEncoder:
    mlm = AutoModelForMaskedLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")
    return SpladeEncoder(mlm).eval()


def export_onnx(model: SpladeEncoder, out: Path) -> None:
    export_token_graph(model, out, "sparse_embedding")


def check(model: SpladeEncoder, tokenizer, onnx_path: Path, max_tokens: int) -> None:
    check_graph(model, tokenizer, onnx_path, max_tokens, "sparse_embedding")


def export(hf_folder: Path, out: Path, *, name: str, max_batch: int = 64, cores: int = 2) -> None:
    from dataclasses import replace

    from ragserve_server.models.model_config import TensorSpec
    from ragserve_server.models.registry import EMBEDDING, SPARSE, TORCH_CUDA, encoder_spec
    from ragserve_server.models.repository import publish_export

    hf_folder = hf_folder.resolve()
    tokenizer = fast_tokenizer(hf_folder)
    model = load(hf_folder)
    out = out.resolve()
    with staging_folder(out) as staging:
        hf_dir = staging / "hf"
        tokenizer.save_pretrained(hf_dir)
        model.mlm.save_pretrained(hf_dir)
        max_tokens = declared_max_tokens(hf_folder, hf_dir)
        export_onnx(model, staging / "1" / "model.onnx")
        check(model, tokenizer, staging / "1" / "model.onnx", max_tokens)
        shutil.copy2(TEMPLATE, staging / "1" / "model.py")
        vocabulary = int(model.mlm.config.vocab_size)
        spec = encoder_spec(
            name=name,
            kind=EMBEDDING,
            triton_model=out.name,
            tokenizer_dir=hf_dir,
            max_input_tokens=max_tokens,
            output=TensorSpec("sparse_embedding", "TYPE_FP32", (vocabulary,), comment="SPLADE weights per vocabulary entry"),
            max_batch=max_batch,
            dimensions=vocabulary,
            onnx_built_by=f"scripts/export_sparse.py --hf-folder {hf_folder} --out {out}",
            cores=cores,
            description=f"sparse (SPLADE) model exported from {hf_folder.name}: token tensors in, vocabulary weights out",
        )
        parameters = {**spec.parameters, TORCH_CUDA: {**spec.parameters[TORCH_CUDA], "head": "splade"}}
        publish_export(replace(spec, parameters=parameters, embedding_output=SPARSE), staging, out)
    print(f"exported {hf_folder} -> {out} (Triton model {out.name!r}, vocabulary {vocabulary}, max {max_tokens} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-folder", type=Path, required=True, help="a Hugging Face masked-LM folder (AutoModelForMaskedLM)")
    parser.add_argument("--out", type=Path, required=True, help="model repository entry to write (its name = Triton model name)")
    parser.add_argument("--name", help="public model name (default: OUT's folder name)")
    parser.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size: rows per Triton request")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the model may use: that many Triton instances")
    args = parser.parse_args()
    export(args.hf_folder, args.out, name=args.name or args.out.name, max_batch=args.max_batch, cores=args.cores)


if __name__ == "__main__":
    main()
