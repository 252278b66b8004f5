"""Exports a Hugging Face embedding model to a Triton model repository entry that the gateway
serves with `--embedding-models NAME=OUT`: an encoder (BERT-like) or a decoder embedder
(Qwen3-Embedding, e5-mistral style: last-token pooling).

    python scripts/export_encoder.py --hf-folder ~/bge-small-en-v1.5 --out model_repository/bge-small
    python scripts/export_encoder.py --hf-folder ~/my-decoder --pooling last_token --normalize \\
        --prompt $'query=Instruct: Given a web search query, retrieve relevant passages\\nQuery: ' --out model_repository/dec

How the model pools and whether it normalises are read from a sentence-transformers folder's
`modules.json` and module configs (Transformer, Pooling, optional Normalize) and built into
the graph; a folder without them (plain transformers) says so with `--pooling` and
`--normalize` (and `--append-eos` where the model wants its end token after every text).
What the graph cannot reproduce is refused, naming it: a Dense or any other module after the
pooling, weighted-mean or concatenated poolings, a pooling that leaves the prompt's tokens out.

Writes OUT/ragserve.json (the model's registry entry: server/ragserve_server/models/registry.py,
with its pooling, normalisation and prompts), OUT/config.pbtxt (rendered from it for the CPU),
OUT/1/model.onnx (token tensors in, the pooled embedding out, L2-normalised when the model
normalises; the gateway cuts `dimensions` and normalises on request), OUT/1/model.py (ONNX
Runtime, scripts/templates/ort_model.py) and OUT/hf/ (tokenizer, config and weights). Before
anything is written in place, the graph is run on texts tokenized and padded the way the
gateway does it and compared with sentence-transformers' own `encode` on the same folder
(every prompt too): a row under cosine 0.9999 (or off in length) stops the export.
`make models` uses `load` and `export_onnx` for all-MiniLM-L6-v2 (mean pooling, unnormalised).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel

from ragserve_server.models.registry import CLS, LAST_TOKEN, MAX, MEAN, MEAN_SQRT_LEN, POOLINGS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_common import CHECK_TEXTS, TEMPLATE, export_token_graph, fast_tokenizer, staging_folder  # noqa: E402

MIN_COSINE = 0.9999
# sentence-transformers' pooling modes -> the registry's (models/registry.py POOLINGS).
ST_POOLINGS = {"mean": MEAN, "cls": CLS, "max": MAX, "lasttoken": LAST_TOKEN, "mean_sqrt_len_tokens": MEAN_SQRT_LEN}
ST_NAMES = {ours: theirs for theirs, ours in ST_POOLINGS.items()}
# Older folders' Pooling configs: one boolean per mode.
ST_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class Refused(SystemExit):
    """What the export cannot reproduce: the message names it, nothing is written."""


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row from the token vectors, over the attention mask (either padding side).

    The same arithmetic as sentence-transformers' Pooling; scripts/templates/torch_encoder_model.py
    has a copy (the GPU variant runs it in Triton, where this file is not importable)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == MEAN:
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == MEAN_SQRT_LEN:
        return (hidden * mask).sum(1) / torch.sqrt(mask.sum(1).clamp(min=1e-9))
    if pooling == MAX:
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    if pooling == CLS:  # the first real token
        index = attention_mask.shape[1] - (attention_mask * (attention_mask.shape[1] - positions)).max(1).values
    elif pooling == LAST_TOKEN:  # the last real token
        index = (attention_mask * positions).max(1).values
    else:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class PooledEncoder(torch.nn.Module):
    """Token tensors in, the pooled (and, with `normalize`, L2-normalised) embedding out."""

    def __init__(self, encoder: torch.nn.Module, pooling: str = MEAN, normalize: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        parameters = inspect.signature(encoder.forward).parameters
        self.token_types = "token_type_ids" in parameters
        self.no_cache = "use_cache" in parameters and getattr(encoder.config, "use_cache", False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {}
        if self.token_types:
            extra["token_type_ids"] = torch.zeros_like(input_ids)
        if self.no_cache:
            extra["use_cache"] = False  # a decoder: no KV cache in the graph
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)  # sentence-transformers' Normalize
        return pooled


MeanPooledEncoder = PooledEncoder  # the name scripts/export_minilm.py knew


def load(hf_folder: Path, pooling: str = MEAN, normalize: bool = False) -> PooledEncoder:
    encoder = AutoModel.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="eager")
    return PooledEncoder(encoder, pooling, normalize).eval()


def export_onnx(model: PooledEncoder, out: Path) -> None:
    """Writes the graph with dynamic batch and sequence axes, atomically."""
    export_token_graph(model, out, "embedding")


@dataclass
class Recipe:
    """What sentence-transformers does with the folder, as far as the graph reproduces it."""

    hf_dir: Path  # the Transformer module's folder (the folder itself, or e.g. 0_Transformer/)
    pooling: str
    normalize: bool
    prompts: dict[str, str] = field(default_factory=dict)  # prompt name -> text (config_sentence_transformers.json)
    default_prompt: str = ""  # the prompt sentence-transformers applies when none is named
    sentence_transformers: bool = True  # False: a plain transformers folder, recipe from the flags


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _pooling_mode(config: dict, where: Path) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in ST_LEGACY_KEYS.items() if config.get(key)]
    if isinstance(mode, (list, tuple)):
        if len(mode) != 1:
            raise Refused(
                f"{where}: pooling modes {list(mode) or 'none'}: ragserve builds one pooling into the graph "
                f"({', '.join(ST_POOLINGS)}); concatenated poolings are not supported; not exported"
            )
        mode = mode[0]
    if mode not in ST_POOLINGS:
        raise Refused(
            f"{where}: pooling mode {mode!r} is not supported (supported: {', '.join(ST_POOLINGS)}); "
            "the served vectors would differ from sentence-transformers'; not exported"
        )
    return ST_POOLINGS[mode]


def read_recipe(folder: Path, pooling: str | None, normalize: bool | None) -> Recipe:
    """The folder's pooling, normalisation and prompts; Refused for what the graph cannot do."""
    settings = _json(folder / "config_sentence_transformers.json")
    prompts = {k: v for k, v in (settings.get("prompts") or {}).items() if isinstance(v, str)}
    default_prompt = prompts.get(settings.get("default_prompt_name") or "", "")
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        if pooling is None:
            raise Refused(
                f"{folder} has no sentence-transformers modules.json: say how the model pools with "
                f"--pooling ({', '.join(POOLINGS)}; decoder embedders: last_token) and add --normalize "
                "if its vectors are L2-normalised; not exported"
            )
        return Recipe(folder, pooling, bool(normalize), prompts, default_prompt, sentence_transformers=False)
    modules = sorted(json.loads(modules_file.read_text()), key=lambda m: m.get("idx", 0))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]) or len(kinds) > 3:
        unsupported = [m.get("type") for m, k in zip(modules, kinds) if k not in ("Transformer", "Pooling", "Normalize")]
        what = f"module(s) {unsupported}" if unsupported else f"the modules {kinds}"
        raise Refused(
            f"{modules_file}: {what} cannot be reproduced in the exported graph: ragserve serves "
            "Transformer -> Pooling -> optional Normalize (a Dense projection or any other module after the "
            "pooling is not supported); not exported"
        )
    pooling_dir = folder / modules[1].get("path", "1_Pooling")
    config = _json(pooling_dir / "config.json")
    found = _pooling_mode(config, pooling_dir / "config.json")
    if config.get("include_prompt", True) is False and any(prompts.values()):
        raise Refused(
            f"{pooling_dir / 'config.json'}: include_prompt is false (the prompt's tokens are left out of the "
            "pooling): not supported; not exported"
        )
    has_normalize = len(kinds) == 3
    if pooling is not None and pooling != found:
        raise Refused(f"--pooling {pooling} contradicts {pooling_dir / 'config.json'} ({found}); drop --pooling")
    if normalize is not None and normalize != has_normalize:
        raise Refused(f"--normalize={normalize} contradicts {modules_file} (Normalize module: {has_normalize}); drop the flag")
    hf_dir = folder / modules[0].get("path", "")
    return Recipe(hf_dir, found, has_normalize, prompts, default_prompt)


def reference_model(folder: Path, recipe: Recipe, plain_dir: Path | None = None):
    """sentence-transformers' model of the folder: the folder itself, or for a plain folder the
    Transformer -> Pooling -> [Normalize] pipeline the flags describe (of `plain_dir`, the
    exported copy, where the export changed the tokenizer)."""
    from sentence_transformers import SentenceTransformer, models

    if recipe.sentence_transformers:
        st = SentenceTransformer(str(folder), device="cpu")
    else:
        transformer = models.Transformer(str(plain_dir or recipe.hf_dir))
        pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=ST_NAMES[recipe.pooling])
        st = SentenceTransformer(
            modules=[transformer, pooling, *([models.Normalize()] if recipe.normalize else [])],
            device="cpu",
            prompts=recipe.prompts,
        )
    st.prompts.update(recipe.prompts)  # --prompt overrides
    tokenizer = st.tokenizer
    if tokenizer.pad_token is None:  # decoders: any id will do, the mask hides it (the ids of a text do not change)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return st


def check(st, folder: Path, recipe: Recipe, hf_dir: Path, onnx_path: Path, max_tokens: int, prefixes: dict[str, str]) -> float:
    """The graph, fed as the gateway feeds it, against sentence-transformers' encode `st` of the
    same folder; returns the lowest cosine."""
    from ragserve_server.encoding.tokenization import TRUNCATE_END, EncoderTokenizer
    from ragserve_server.models.buckets import bucket_length

    tokenizer = EncoderTokenizer(hf_dir / "tokenizer.json", max_tokens)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    texts = CHECK_TEXTS + [" ".join(["over the limit"] * max_tokens)]  # truncated on both sides alike
    worst = 1.0
    for input_type in [""] + [t for t in ("query", "passage") if prefixes.get(t)]:
        sequences = tokenizer.encode([prefixes.get(input_type, "") + t for t in texts], TRUNCATE_END)
        got = []
        for seq in sequences:  # one row at a time, padded to its length bucket as the gateway does
            batch = tokenizer.pad([seq], bucket_length(len(seq), max_tokens))
            got.append(session.run(["embedding"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})[0][0])
        got = np.stack(got)
        # sentence-transformers picks the prompt by its own name (no name: its default prompt).
        if input_type == "":
            kwargs = {"prompt": recipe.prompts[""]} if "" in recipe.prompts else {}
        else:
            kwargs = {"prompt_name": input_type if input_type in st.prompts else "document"}
        want = st.encode(texts, batch_size=len(texts), convert_to_numpy=True, **kwargs)
        cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        ratio = np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        worst = min(worst, float(cosine.min()))
        if cosine.min() < MIN_COSINE or np.abs(ratio - 1).max() > 1e-3:
            raise Refused(
                f"the exported graph differs from sentence-transformers' encode of {folder} (input type "
                f"{input_type or 'unspecified'!r}): cosine {cosine.round(6).tolist()}, length ratio "
                f"{ratio.round(6).tolist()} (need cosine >= {MIN_COSINE}); not exported"
            )
    return worst


def export(
    hf_folder: Path,
    out: Path,
    *,
    name: str,
    max_batch: int = 64,
    cores: int = 2,
    pooling: str | None = None,
    normalize: bool | None = None,
    prompts: dict[str, str] | None = None,
    append_eos: bool = False,
) -> None:
    from ragserve_server.models.catalog import max_tokens_of
    from ragserve_server.models.model_config import TensorSpec
    from ragserve_server.models.registry import EMBEDDING, encoder_spec
    from ragserve_server.models.repository import publish_export

    hf_folder = hf_folder.resolve()
    recipe = read_recipe(hf_folder, pooling, normalize)
    recipe.prompts.update(prompts or {})
    tokenizer = fast_tokenizer(recipe.hf_dir, Refused)
    if append_eos:
        _append_eos(tokenizer, recipe)
    model = load(recipe.hf_dir, recipe.pooling, recipe.normalize)
    out = out.resolve()
    with staging_folder(out) as staging:
        hf_dir = staging / "hf"
        tokenizer.save_pretrained(hf_dir)
        model.encoder.save_pretrained(hf_dir)
        for extra in ("sentence_bert_config.json", "config_sentence_transformers.json"):
            if (hf_folder / extra).exists():
                shutil.copy2(hf_folder / extra, hf_dir / extra)
        # sentence-transformers' limit (sentence_bert_config.json, else the tokenizer's), within
        # the position embeddings.
        st = reference_model(hf_folder, recipe, hf_dir if append_eos else None)
        max_tokens = min(int(st.max_seq_length), max_tokens_of(hf_dir)) if st.max_seq_length else max_tokens_of(hf_dir)
        st.max_seq_length = max_tokens
        # Input type -> prefix; "" (no input type) where the model names a default prompt.
        prefixes = {
            "query": recipe.prompts.get("query", ""),
            "passage": recipe.prompts.get("passage", recipe.prompts.get("document", "")),
            "": recipe.prompts.get("", recipe.default_prompt),
        }
        prefixes = {k: v for k, v in prefixes.items() if v}
        export_onnx(model, staging / "1" / "model.onnx")
        worst = check(st, hf_folder, recipe, hf_dir, staging / "1" / "model.onnx", max_tokens, prefixes)
        shutil.copy2(TEMPLATE, staging / "1" / "model.py")
        hidden = int(model.encoder.config.hidden_size)
        what = f"{recipe.pooling}-pooled, {'L2-normalised' if recipe.normalize else 'not normalised'}"
        spec = encoder_spec(
            name=name,
            kind=EMBEDDING,
            triton_model=out.name,
            tokenizer_dir=hf_dir,
            max_input_tokens=max_tokens,
            output=TensorSpec("embedding", "TYPE_FP32", (hidden,), comment=what),
            max_batch=max_batch,
            dimensions=hidden,
            prefixes=prefixes,
            onnx_built_by=f"scripts/export_encoder.py --hf-folder {hf_folder} --out {out}",
            cores=cores,
            description=f"embedding model exported from {hf_folder.name}: token tensors in, {what} embedding out",
            pooling=recipe.pooling,
            normalize=recipe.normalize,
        )
        publish_export(spec, staging, out)
    print(
        f"exported {hf_folder} -> {out} (Triton model {out.name!r}, {hidden} dimensions, max {max_tokens} tokens, "
        f"{what}; lowest cosine against sentence-transformers {worst:.6f})"
    )


def _append_eos(tokenizer, recipe: Recipe) -> None:
    """Makes the tokenizer end every text with its end token (the gateway reads tokenizer.json,
    so truncation keeps room for it), as decoder embedders trained that way need."""
    if recipe.sentence_transformers:
        raise Refused(
            f"--append-eos: {recipe.hf_dir} is a sentence-transformers folder; its tokenizer already does what "
            "sentence-transformers does (and the vectors must equal its encode); drop --append-eos"
        )
    if tokenizer.eos_token is None:
        raise Refused(f"--append-eos: the tokenizer of {recipe.hf_dir} has no eos_token; not exported")
    if tokenizer("a")["input_ids"][-1:] == [tokenizer.eos_token_id]:
        return  # it appends one already
    tokenizer.add_eos_token = True
    if tokenizer("a")["input_ids"][-1:] != [tokenizer.eos_token_id]:
        raise Refused(
            f"--append-eos: the tokenizer of {recipe.hf_dir} ({type(tokenizer).__name__}) cannot be made to append "
            f"{tokenizer.eos_token!r}; not exported"
        )


def _prompt(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    name = {"document": "passage"}.get(name, name)  # sentence-transformers' name for passages
    if not sep or name not in ("query", "passage", ""):
        raise argparse.ArgumentTypeError(
            f"expected query=TEXT, passage=TEXT (or document=TEXT), or =TEXT for no input type; got {value!r}"
        )
    return name, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-folder", type=Path, required=True, help="a sentence-transformers or Hugging Face model folder (AutoModel)")
    parser.add_argument("--out", type=Path, required=True, help="model repository entry to write (its name = Triton model name)")
    parser.add_argument("--name", help="public model name (default: OUT's folder name)")
    parser.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size: rows per Triton request")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the model may use: that many Triton instances (registry.FEW_ROWS_MAX_ROWS)")
    parser.add_argument("--pooling", choices=POOLINGS, help="a folder without modules.json: how the model pools (decoders: last_token)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="a folder without modules.json: the model's vectors are L2-normalised")
    parser.add_argument("--prompt", type=_prompt, action="append", default=[], metavar="TYPE=TEXT",
                        help="text put before inputs of an input type (query / passage or document; an instruction such as "
                             "'Instruct: <task>\\nQuery: '); overrides the folder's prompts")
    parser.add_argument("--append-eos", action="store_true",
                        help="a folder without modules.json: end every text with the tokenizer's end token "
                             "(decoder embedders trained so, e5-mistral style), written into the exported tokenizer")
    args = parser.parse_args()
    export(
        args.hf_folder, args.out, name=args.name or args.out.name, max_batch=args.max_batch, cores=args.cores,
        pooling=args.pooling, normalize=args.normalize, prompts=dict(args.prompt), append_eos=args.append_eos,
    )


if __name__ == "__main__":
    main()
