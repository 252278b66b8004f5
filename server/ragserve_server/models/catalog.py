"""The models this gateway serves, looked up by the name a request gives.

Built once at start-up from registry entries (`registry.py` holds every fact about a
model); services look models up by name (empty = the default of that kind).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ragserve_server.errors import ModelNotFound
from ragserve_server.models.llm_rerankers import LlmReranker
from ragserve_server.models.registry import BI_ENCODER, CROSS_ENCODER, DENSE, EMBEDDING, GENERATION, MAXSIM, ModelSpec

__all__ = ["BI_ENCODER", "CROSS_ENCODER", "EMBEDDING", "GENERATION", "LLM_RERANKER", "MAXSIM", "Catalog", "ServedModel", "build_catalog", "served"]


@dataclass(frozen=True)
class ServedModel:
    """A registry entry as this gateway serves it, with the per-call limits of its service."""

    name: str
    kind: str
    triton_model: str
    model_dir: Path  # holds tokenizer.json and the model's config files
    max_input_tokens: int
    max_batch: int  # most texts (Embed) or documents (Rerank) in one call
    rows_per_request: int  # most rows in one Triton request: the model's max_batch_size
    dimensions: int = 0
    # Prefixes applied per input type (sentence-transformers "prompts"), where the model has them.
    prefixes: dict[str, str] = field(default_factory=dict)
    # Bi-encoder rerankers score with this embedding model.
    embedding_model: str = ""
    spec: ModelSpec | None = None
    revision: str = ""  # where the weights came from (ModelSpec.revision)
    matryoshka_dimensions: tuple[int, ...] = ()  # trained cut sizes; empty: cutting allowed, not trained for
    int8_calibration: Mapping | None = None  # int8/uint8 ranges (quantize.py); None: no int8/uint8
    # Rerankers: the ranges of RerankResult.relevance_score and raw_score.
    score_range: tuple[float, float] | None = None
    raw_score_range: tuple[float, float] | None = None
    # LLM_RERANKER models: the entry (prompts, candidate tokens, window) of llm_rerankers.py.
    llm_reranker: LlmReranker | None = None
    # Embedding models: DENSE, SPARSE or MULTI_VECTOR (registry.EMBEDDING_OUTPUTS).
    embedding_output: str = DENSE

    @property
    def max_inputs_per_call(self) -> int:
        """Texts per Embed / Tokenize call, documents per Rerank call (1 for generation)."""
        return self.max_batch

    @property
    def max_tokens_per_batch(self) -> int:
        """Tokens one Triton request can carry: rows x the longest input."""
        return self.rows_per_request * self.max_input_tokens


# Rerank score ranges per kind: relevance_score is in [0, 1] for every reranker; the raw score
# is the cosine (bi-encoder) or the logit (cross-encoder).
# MaxSim's raw score is the sum over query tokens of their best cosine (bounded by the query's
# length); its relevance is (raw / query tokens + 1) / 2.
_SCORE_RANGES = {
    BI_ENCODER: ((0.0, 1.0), (-1.0, 1.0)),
    CROSS_ENCODER: ((0.0, 1.0), (-math.inf, math.inf)),
    MAXSIM: ((0.0, 1.0), (-math.inf, math.inf)),
}


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

    @property
    def specs(self) -> list[ModelSpec]:
        """The registry entries behind the served models, one per Triton model."""
        seen: dict[str, ModelSpec] = {}
        for model in self.models:
            if model.spec is not None:
                seen.setdefault(model.spec.triton_model, model.spec)
        return list(seen.values())


def served(spec: ModelSpec, *, max_inputs_per_call: int = 2048, max_documents_per_call: int = 1000) -> list[ServedModel]:
    """The served models of one registry entry: an embedding model may also be a bi-encoder reranker."""
    per_call = {EMBEDDING: max_inputs_per_call, CROSS_ENCODER: max_documents_per_call, GENERATION: 1}[spec.kind]
    model = ServedModel(
        name=spec.name,
        kind=spec.kind,
        triton_model=spec.triton_model,
        model_dir=spec.tokenizer_dir,
        max_input_tokens=spec.max_input_tokens,
        max_batch=per_call,
        rows_per_request=max(spec.max_batch, 1),
        dimensions=spec.dimensions,
        prefixes=dict(spec.prefixes),
        spec=spec,
        revision=spec.revision,
        matryoshka_dimensions=tuple(spec.matryoshka_dimensions),
        int8_calibration=spec.int8_calibration if spec.kind == EMBEDDING else None,
        score_range=_SCORE_RANGES.get(spec.kind, (None, None))[0],
        raw_score_range=_SCORE_RANGES.get(spec.kind, (None, None))[1],
        embedding_output=spec.embedding_output,
    )
    if spec.llm_rerankers:
        return [model, *(_llm_reranker(spec, r) for r in spec.llm_rerankers)]
    if spec.maxsim_reranker:
        # MaxSim over the per-token vectors of a multi-vector model: an exported model's "{name}-maxsim".
        name = spec.maxsim_reranker.replace("{name}", spec.name)
        return [model, _derived_reranker(spec, MAXSIM, name, max_documents_per_call)]
    if spec.bi_encoder:
        # Cosine similarity of the embedding model's vectors.
        return [model, _derived_reranker(spec, BI_ENCODER, f"{spec.name}-bi-encoder", max_documents_per_call)]
    return [model]


def _derived_reranker(spec: ModelSpec, kind: str, name: str, max_documents_per_call: int) -> ServedModel:
    """A reranker computed from an embedding model's outputs by the same Triton model (its
    weights are loaded once): scores come from `embedding_model`'s vectors."""
    return ServedModel(
        name=name,
        kind=kind,
        triton_model=spec.triton_model,
        model_dir=spec.tokenizer_dir,
        max_input_tokens=spec.max_input_tokens,
        max_batch=max_documents_per_call,
        rows_per_request=max(spec.max_batch, 1),
        embedding_model=spec.name,
        spec=spec,
        revision=spec.revision,
        score_range=_SCORE_RANGES[kind][0],
        raw_score_range=_SCORE_RANGES[kind][1],
    )


# Rerank models served by a generation model's prefill-only scoring (llm_rerankers.py).
LLM_RERANKER = "llm_reranker"


def _llm_reranker(spec: ModelSpec, reranker: LlmReranker) -> ServedModel:
    """An LLM reranker over the generation model `spec` (same Triton model, same tokenizer).
    Pointwise: relevance sigmoid(logit difference) in (0, 1); listwise: (n - rank) / n in (0, 1]."""
    return ServedModel(
        name=reranker.name,
        kind=LLM_RERANKER,
        triton_model=spec.triton_model,
        model_dir=spec.tokenizer_dir,
        max_input_tokens=spec.max_input_tokens,
        max_batch=reranker.max_documents,
        rows_per_request=1,
        spec=spec,
        revision=spec.revision,
        score_range=(0.0, 1.0),
        raw_score_range=(-math.inf, math.inf),
        llm_reranker=reranker,
    )


def build_catalog(
    specs: Sequence[ModelSpec],
    *,
    max_inputs_per_call: int = 2048,
    max_documents_per_call: int = 1000,
    default_reranker: str = "",
) -> Catalog:
    """The served models of `specs` (in order: the first of a kind is its default);
    `default_reranker` empty = the first bi-encoder, else the first cross-encoder."""
    models: list[ServedModel] = []
    defaults: dict[str, str] = {}
    for spec in specs:
        for model in served(spec, max_inputs_per_call=max_inputs_per_call, max_documents_per_call=max_documents_per_call):
            if any(m.name == model.name for m in models):
                raise ValueError(f"model name {model.name!r} is given twice; rename one (name=folder in the flag)")
            models.append(model)
            if model.kind in (EMBEDDING, GENERATION):
                defaults.setdefault(model.kind, model.name)
    rerankers = [m for m in models if m.kind in (BI_ENCODER, CROSS_ENCODER, MAXSIM, LLM_RERANKER)]
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
