"""Triton model configurations as protobuf: tensor specs, parse, render, compare.

`config.pbtxt` is text-format `inference.ModelConfig` (tritonclient's `model_config_pb2`):
every config is built and read through that schema, never with regexes or string templates.
This module has no knowledge of particular models; `registry.py` holds those facts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ModelConfig = model_config_pb2.ModelConfig

# Triton data type name (config.pbtxt) -> numpy dtype the gateway sends / reads.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "TYPE_BOOL": np.dtype(np.bool_),
    "TYPE_INT32": np.dtype(np.int32),
    "TYPE_INT64": np.dtype(np.int64),
    "TYPE_UINT64": np.dtype(np.uint64),
    "TYPE_FP16": np.dtype(np.float16),
    "TYPE_FP32": np.dtype(np.float32),
    "TYPE_STRING": np.dtype(np.object_),
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model, as config.pbtxt declares it.

    `dims` excludes the batch dimension when the model has `max_batch_size > 0`.
    `reshape`, where set, is the shape the model itself sees (TensorRT-LLM declares scalars
    as `dims: [1]` with `reshape: { shape: [] }`).
    """

    name: str
    dtype: str  # "TYPE_INT64", ...
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None
    allow_ragged_batch: bool = False
    comment: str = ""

    @property
    def numpy_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]

    def to_input(self) -> model_config_pb2.ModelInput:
        tensor = model_config_pb2.ModelInput(
            name=self.name,
            data_type=model_config_pb2.DataType.Value(self.dtype),
            dims=list(self.dims),
            optional=self.optional,
            allow_ragged_batch=self.allow_ragged_batch,
        )
        if self.reshape is not None:
            tensor.reshape.shape.extend(self.reshape)
        return tensor

    def to_output(self) -> model_config_pb2.ModelOutput:
        tensor = model_config_pb2.ModelOutput(
            name=self.name, data_type=model_config_pb2.DataType.Value(self.dtype), dims=list(self.dims)
        )
        if self.reshape is not None:
            tensor.reshape.shape.extend(self.reshape)
        return tensor


def parse(text: str) -> ModelConfig:
    """A config.pbtxt's text as a ModelConfig (text_format.ParseError on a malformed file)."""
    return text_format.Parse(text, ModelConfig())


def read(path: Path) -> ModelConfig:
    try:
        return parse(Path(path).read_text())
    except text_format.ParseError as exc:
        raise ValueError(f"{path}: not a valid Triton model config: {exc}") from exc


def render(config: ModelConfig, header: str = "") -> str:
    """Text format, with a comment header saying where it came from."""
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    return "\n".join(lines) + ("\n" if lines else "") + text_format.MessageToString(config)


def write(path: Path, config: ModelConfig, header: str = "") -> None:
    """Writes atomically (Triton or a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(config, header))
    tmp.replace(path)


def set_parameters(config: ModelConfig, parameters: Mapping[str, str]) -> None:
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)


def parameters_of(config: ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def _dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def mismatches(
    model: str,
    expected_max_batch: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    config: ModelConfig,
    *,
    exact_batch: bool = True,
) -> list[str]:
    """What differs between the tensors the gateway sends/reads and a model's config.

    Each line names the model, the field and both values, so a refused start says exactly
    what to fix. Only what the gateway depends on is compared: max batch (equal, or with
    `exact_batch=False` at least 1), the names, dtypes and dims of the inputs it sends
    (required ones must all be sent) and the outputs it reads.
    """
    problems = []
    if not exact_batch:
        # One row per request (generation): any batching model serves it, e.g. a TensorRT-LLM
        # engine built for 256 sequences.
        if config.max_batch_size < 1:
            problems.append(
                f"{model}: max_batch_size is {config.max_batch_size} in Triton's config, the gateway sends requests "
                f"with a batch dimension (max_batch_size >= 1 needed)"
            )
    elif config.max_batch_size != expected_max_batch:
        problems.append(
            f"{model}: max_batch_size is {config.max_batch_size} in Triton's config, the gateway sends up to "
            f"{expected_max_batch} rows per request"
        )
    served_inputs = {t.name: t for t in config.input}
    for spec in inputs:
        actual = served_inputs.pop(spec.name, None)
        if actual is None:
            if not spec.optional:
                problems.append(f"{model}: input {spec.name!r} ({spec.dtype} {list(spec.dims)}) is missing from Triton's config")
            continue
        problems += _compare_tensor(model, "input", spec, _dtype_name(actual.data_type), tuple(actual.dims))
    for name, actual in served_inputs.items():
        if not actual.optional:
            problems.append(f"{model}: Triton's config requires input {name!r}, which the gateway never sends")
    served_outputs = {t.name: t for t in config.output}
    for spec in outputs:
        actual = served_outputs.get(spec.name)
        if actual is None:
            if not spec.optional:  # an optional output is asked for only from a model that has it
                problems.append(f"{model}: output {spec.name!r} is missing from Triton's config")
            continue
        problems += _compare_tensor(model, "output", spec, _dtype_name(actual.data_type), tuple(actual.dims))
    return problems


def _compare_tensor(model: str, what: str, spec: TensorSpec, dtype: str, dims: tuple[int, ...]) -> list[str]:
    problems = []
    if dtype != spec.dtype:
        problems.append(f"{model}: {what} {spec.name!r} is {dtype} in Triton's config, the gateway uses {spec.dtype}")
    if not _dims_compatible(spec.dims, dims):
        problems.append(f"{model}: {what} {spec.name!r} has dims {list(dims)} in Triton's config, the gateway uses {list(spec.dims)}")
    return problems


def _dims_compatible(ours: tuple[int, ...], theirs: tuple[int, ...]) -> bool:
    """Equal rank, and each fixed dimension equal where both are fixed (-1 = variable)."""
    return len(ours) == len(theirs) and all(a == b or a == -1 or b == -1 for a, b in zip(ours, theirs))
