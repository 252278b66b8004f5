"""ragserve.v1.Models: what this gateway serves."""

from __future__ import annotations

from ragserve.v1 import models_pb2, models_pb2_grpc
from ragserve_server.catalog import BI_ENCODER, CROSS_ENCODER, EMBEDDING, GENERATION, Catalog

_KINDS = {
    EMBEDDING: models_pb2.MODEL_KIND_EMBEDDING,
    CROSS_ENCODER: models_pb2.MODEL_KIND_CROSS_ENCODER,
    BI_ENCODER: models_pb2.MODEL_KIND_BI_ENCODER,
    GENERATION: models_pb2.MODEL_KIND_GENERATION,
}


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def ListModels(self, request, context) -> models_pb2.ListModelsResponse:
        defaults = set(self.catalog.defaults.values())
        return models_pb2.ListModelsResponse(
            models=[
                models_pb2.ModelInfo(
                    name=m.name,
                    kind=_KINDS[m.kind],
                    dimensions=m.dimensions,
                    max_input_tokens=m.max_input_tokens,
                    max_batch=m.max_batch,
                    is_default=m.name in defaults,
                )
                for m in self.catalog.models
            ]
        )
