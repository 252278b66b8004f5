"""The gateway's typed errors and the one table that turns them into gRPC status codes.

Service code raises these; the call guard (calls/call_scope.py, or a stream handler, per message) maps them.
"""

from __future__ import annotations

import grpc


class RagserveError(Exception):
    """Base of every error the gateway answers on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"  # label for the rejections metric

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(RagserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_input"


class ModelNotFound(RagserveError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "model_not_found"


class Overloaded(RagserveError):
    """A full lane or a full queue. `retry_after`: seconds the caller should wait, sent as
    `grpc-retry-pushback-ms` and a google.rpc.RetryInfo detail (transport/pushback.py)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "overload"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(RagserveError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "backend_unavailable"


class DeadlineExceeded(RagserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline"


class Cancelled(RagserveError):
    code = grpc.StatusCode.CANCELLED
    reason = "cancelled"


class Unauthenticated(RagserveError):
    """No API key, or one that is not in the keys file."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class PermissionDenied(RagserveError):
    """A valid API key that may not call this service."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class BackendError(RagserveError):
    """Triton answered with an error the gateway did not expect."""

    code = grpc.StatusCode.INTERNAL
    reason = "backend_error"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for an exception."""
    if isinstance(exc, RagserveError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
