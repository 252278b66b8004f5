from ragserve.v1 import embed_pb2 as _embed_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_EMBEDDING: _ClassVar[ModelKind]
    MODEL_KIND_CROSS_ENCODER: _ClassVar[ModelKind]
    MODEL_KIND_BI_ENCODER: _ClassVar[ModelKind]
    MODEL_KIND_GENERATION: _ClassVar[ModelKind]
    MODEL_KIND_MAXSIM: _ClassVar[ModelKind]

class EmbeddingOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_OUTPUT_UNSPECIFIED: _ClassVar[EmbeddingOutput]
    EMBEDDING_OUTPUT_DENSE: _ClassVar[EmbeddingOutput]
    EMBEDDING_OUTPUT_SPARSE: _ClassVar[EmbeddingOutput]
    EMBEDDING_OUTPUT_MULTI_VECTOR: _ClassVar[EmbeddingOutput]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]
    POOLING_LAST_TOKEN: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
    POOLING_MEAN_SQRT_LEN: _ClassVar[Pooling]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_EMBEDDING: ModelKind
MODEL_KIND_CROSS_ENCODER: ModelKind
MODEL_KIND_BI_ENCODER: ModelKind
MODEL_KIND_GENERATION: ModelKind
MODEL_KIND_MAXSIM: ModelKind
EMBEDDING_OUTPUT_UNSPECIFIED: EmbeddingOutput
EMBEDDING_OUTPUT_DENSE: EmbeddingOutput
EMBEDDING_OUTPUT_SPARSE: EmbeddingOutput
EMBEDDING_OUTPUT_MULTI_VECTOR: EmbeddingOutput
POOLING_UNSPECIFIED: Pooling
POOLING_MEAN: Pooling
POOLING_CLS: Pooling
POOLING_LAST_TOKEN: Pooling
POOLING_MAX: Pooling
POOLING_MEAN_SQRT_LEN: Pooling

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputTypePrefix(_message.Message):
    __slots__ = ("input_type", "prefix")
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    input_type: _embed_pb2.InputType
    prefix: str
    def __init__(self, input_type: _Optional[_Union[_embed_pb2.InputType, str]] = ..., prefix: _Optional[str] = ...) -> None: ...

class ScoreRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "dimensions", "max_input_tokens", "max_batch", "is_default", "max_inputs_per_call", "max_batch_rows", "max_tokens_per_batch", "input_types", "dimensions_may_be_cut", "matryoshka_dimensions", "score_range", "raw_score_range", "revision", "encodings", "pooling", "normalized_by_model", "embedding_output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPES_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_MAY_BE_CUT_FIELD_NUMBER: _ClassVar[int]
    MATRYOSHKA_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    SCORE_RANGE_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_RANGE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelKind
    dimensions: int
    max_input_tokens: int
    max_batch: int
    is_default: bool
    max_inputs_per_call: int
    max_batch_rows: int
    max_tokens_per_batch: int
    input_types: _containers.RepeatedCompositeFieldContainer[InputTypePrefix]
    dimensions_may_be_cut: bool
    matryoshka_dimensions: _containers.RepeatedScalarFieldContainer[int]
    score_range: ScoreRange
    raw_score_range: ScoreRange
    revision: str
    encodings: _containers.RepeatedScalarFieldContainer[_embed_pb2.EmbeddingEncoding]
    pooling: Pooling
    normalized_by_model: bool
    embedding_output: EmbeddingOutput
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., dimensions: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., max_batch: _Optional[int] = ..., is_default: bool = ..., max_inputs_per_call: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_tokens_per_batch: _Optional[int] = ..., input_types: _Optional[_Iterable[_Union[InputTypePrefix, _Mapping]]] = ..., dimensions_may_be_cut: bool = ..., matryoshka_dimensions: _Optional[_Iterable[int]] = ..., score_range: _Optional[_Union[ScoreRange, _Mapping]] = ..., raw_score_range: _Optional[_Union[ScoreRange, _Mapping]] = ..., revision: _Optional[str] = ..., encodings: _Optional[_Iterable[_Union[_embed_pb2.EmbeddingEncoding, str]]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., normalized_by_model: bool = ..., embedding_output: _Optional[_Union[EmbeddingOutput, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
