"""ragserve SDK: typed Embed, Rerank and Generate calls to a ragserve gateway."""

from ragserve._client import AsyncClient, Client
from ragserve._errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelNotFoundError,
    OverloadedError,
    RagserveError,
    ServerError,
    UnavailableError,
)
from ragserve._types import EmbedResult, GenerateResult, ModelInfo, RankedDocument, RerankResult, TextDelta, Usage

__all__ = [
    "AsyncClient",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "EmbedResult",
    "GenerateResult",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelNotFoundError",
    "OverloadedError",
    "RagserveError",
    "RankedDocument",
    "RerankResult",
    "ServerError",
    "TextDelta",
    "UnavailableError",
    "Usage",
]
