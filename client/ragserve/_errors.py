"""The SDK's exceptions, one per way a call can fail, mapped from gRPC status codes.

Embed, Rerank and ListModels calls are retried on UNAVAILABLE and RESOURCE_EXHAUSTED before
one of these is raised (the clients' `retries=`); Generate and the streams are not.

    RagserveError
    ├── InvalidArgumentError   INVALID_ARGUMENT: fix the request
    ├── ModelNotFoundError     NOT_FOUND: unknown model name
    ├── OverloadedError        RESOURCE_EXHAUSTED: retry later, with backoff
    ├── UnavailableError       UNAVAILABLE: server or model backend down (or a TLS handshake failed); retry later
    ├── UnauthenticatedError   UNAUTHENTICATED: no API key, or not a valid one
    ├── PermissionDeniedError  PERMISSION_DENIED: the API key may not call this service
    ├── DeadlineExceededError  DEADLINE_EXCEEDED: the call's timeout passed
    ├── CancelledError         CANCELLED
    └── ServerError            anything else (INTERNAL, UNIMPLEMENTED, ...)
"""

from __future__ import annotations

import grpc


class RagserveError(Exception):
    """Base class: `code` is the gRPC status code, `request_id` the server's id for the call."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id


class InvalidArgumentError(RagserveError):
    pass


class ModelNotFoundError(RagserveError):
    pass


class OverloadedError(RagserveError):
    pass


class UnavailableError(RagserveError):
    pass


class UnauthenticatedError(RagserveError):
    pass


class PermissionDeniedError(RagserveError):
    pass


class DeadlineExceededError(RagserveError):
    pass


class CancelledError(RagserveError):
    pass


class ServerError(RagserveError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def error_for_code(code: grpc.StatusCode, message: str, request_id: str | None = None) -> RagserveError:
    return _BY_CODE.get(code, ServerError)(message, code=code, request_id=request_id)


def from_rpc_error(exc: grpc.RpcError) -> RagserveError:
    """The SDK error for a failed call (grpc.RpcError and grpc.aio.AioRpcError alike)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    request_id = None
    for metadata in (_metadata(exc, "initial_metadata"), _metadata(exc, "trailing_metadata")):
        for key, value in metadata or ():
            if key == "x-request-id":
                request_id = value
    return error_for_code(code, details or code.name, request_id)


def _metadata(exc: grpc.RpcError, name: str):
    getter = getattr(exc, name, None)
    try:
        return getter() if callable(getter) else None
    except Exception:  # noqa: BLE001 - metadata is a nicety; never hide the real error
        return None
