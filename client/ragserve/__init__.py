"""ragserve SDK: typed Embed, Rerank and Generate calls to a ragserve gateway."""

from ragserve._client import AsyncClient, Client
from ragserve._errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelNotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RagserveError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from ragserve._types import EmbedResult, GenerateResult, ModelInfo, RankedDocument, RerankResult, TextDelta, Usage
from ragserve._types import TokenLogprob, TopLogprob
from ragserve._types import EmbedBatch, TokenizedText, TokenizeResult
from ragserve._types import SparseEmbedding

__all__ = [
    "AsyncClient",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "EmbedBatch",
    "EmbedResult",
    "GenerateResult",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelNotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RagserveError",
    "RankedDocument",
    "RerankResult",
    "ServerError",
    "SparseEmbedding",
    "TextDelta",
    "TokenLogprob",
    "TokenizeResult",
    "TokenizedText",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
