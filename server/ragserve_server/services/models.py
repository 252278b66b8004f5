"""ragserve.v1.Models: what this gateway serves (every fact read from the catalog / registry)."""

from __future__ import annotations

from ragserve.v1 import models_pb2, models_pb2_grpc
from ragserve_server.encoding import quantize
from ragserve_server.models.catalog import EMBEDDING, Catalog, ServedModel
from ragserve_server.models.registry import CLS, DENSE, LAST_TOKEN, MAX, MEAN, MEAN_SQRT_LEN, MULTI_VECTOR, SPARSE
from ragserve_server.services.common import INPUT_TYPES, MODEL_KINDS
from ragserve_server.services.embed import ENCODING_VALUES


# The registry's poolings and the API's values.
POOLINGS = {
    MEAN: models_pb2.POOLING_MEAN,
    CLS: models_pb2.POOLING_CLS,
    LAST_TOKEN: models_pb2.POOLING_LAST_TOKEN,
    MAX: models_pb2.POOLING_MAX,
    MEAN_SQRT_LEN: models_pb2.POOLING_MEAN_SQRT_LEN,
}

# The registry's embedding outputs and the API's values.
EMBEDDING_OUTPUTS = {
    DENSE: models_pb2.EMBEDDING_OUTPUT_DENSE,
    SPARSE: models_pb2.EMBEDDING_OUTPUT_SPARSE,
    MULTI_VECTOR: models_pb2.EMBEDDING_OUTPUT_MULTI_VECTOR,
}


def model_info(m: ServedModel, is_default: bool) -> models_pb2.ModelInfo:
    info = models_pb2.ModelInfo(
        name=m.name,
        kind=MODEL_KINDS[m.kind],
        dimensions=m.dimensions,
        max_input_tokens=m.max_input_tokens,
        max_batch=m.max_inputs_per_call,  # deprecated twin of max_inputs_per_call, for older clients
        is_default=is_default,
        max_inputs_per_call=m.max_inputs_per_call,
        max_batch_rows=m.rows_per_request,
        max_tokens_per_batch=m.max_tokens_per_batch,
        revision=m.revision,
    )
    if m.kind == EMBEDDING:
        info.input_types.extend(
            models_pb2.InputTypePrefix(input_type=value, prefix=m.prefixes.get(name, ""))
            for value, name in INPUT_TYPES.items()
            if name or m.prefixes.get(name)  # no input type: listed where the model has a default prompt
        )
        dense = m.embedding_output == DENSE
        if m.spec is not None and dense:  # sparse and multi-vector models do not pool
            info.pooling = POOLINGS[m.spec.pooling]
            info.normalized_by_model = m.spec.normalize
        info.embedding_output = EMBEDDING_OUTPUTS[m.embedding_output]
        info.normalized_by_model |= m.embedding_output == MULTI_VECTOR  # unit token vectors
        info.dimensions_may_be_cut = dense
        info.matryoshka_dimensions.extend(m.matryoshka_dimensions)
        encodings = quantize.encodings_of(m.int8_calibration is not None) if dense else (quantize.FLOAT,)
        info.encodings.extend(ENCODING_VALUES[e] for e in encodings)
    if m.score_range is not None:
        info.score_range.CopyFrom(models_pb2.ScoreRange(min=m.score_range[0], max=m.score_range[1]))
    if m.raw_score_range is not None:
        info.raw_score_range.CopyFrom(models_pb2.ScoreRange(min=m.raw_score_range[0], max=m.raw_score_range[1]))
    return info


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def ListModels(self, request, context) -> models_pb2.ListModelsResponse:
        defaults = set(self.catalog.defaults.values())
        return models_pb2.ListModelsResponse(models=[model_info(m, m.name in defaults) for m in self.catalog.models])
