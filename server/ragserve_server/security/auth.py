"""API-key authentication and per-service permission, as a server interceptor.

A caller sends its key as `authorization: Bearer <key>` or `x-api-key: <key>`. No key or an
unknown one is answered UNAUTHENTICATED, a key whose entry does not list the service
PERMISSION_DENIED; grpc.health.v1 is always open (probes carry no keys) and reflection is
open, keyed or off (`--reflection`).

It sits after the GatewayInterceptor in the server's chain: a refused call is then raised as
a typed error inside the gateway's scope, so the one error table, the rejection metric
(reasons `unauthenticated`, `permission_denied`), the request id and the access log treat it
like any other refusal. It binds `api_key_name` to structlog's context (the access log line
names the key's name); the key itself is never logged.
"""

from __future__ import annotations

import contextvars

import grpc
import structlog

from ragserve.v1 import embed_pb2, generate_pb2, models_pb2, rerank_pb2, tokenize_pb2
from ragserve_server.errors import PermissionDenied, RagserveError, Unauthenticated
from ragserve_server.security.keys import KeyStore

KEYED_SERVICES = frozenset(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (embed_pb2, "Embed"), (rerank_pb2, "Rerank"), (generate_pb2, "Generate"), (models_pb2, "Models"), (tokenize_pb2, "Tokenize"),
    )
)
REFLECTION_MODES = ("open", "keyed", "off")
# The refusal of the call running in this task, for the gateway's scope to raise before it
# takes an admission permit (`raise_refusal()`); the refusing handler raises it anyway.
_REFUSAL: contextvars.ContextVar[RagserveError | None] = contextvars.ContextVar("ragserve_auth_refusal", default=None)
_HEALTH_PREFIX = "/grpc.health."
_REFLECTION_PREFIX = "/grpc.reflection."


def presented_key(metadata) -> str | None:
    """The caller's key from `authorization: Bearer <key>` (first) or `x-api-key`."""
    api_key = None
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and isinstance(value, str) and value.strip():
            api_key = value.strip()
    return api_key


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`keys` None: every call is open (reflection still follows `reflection`)."""

    def __init__(self, keys: KeyStore | None, reflection: str = "open") -> None:
        if reflection not in REFLECTION_MODES:
            raise ValueError(f"--reflection {reflection!r}: use one of {', '.join(REFLECTION_MODES)}")
        self.keys = keys
        self.reflection = reflection

    def check(self, method_path: str, metadata) -> RagserveError | None:
        """The refusal for a call, or None when it may go on (its key's name then bound)."""
        if method_path.startswith(_HEALTH_PREFIX):
            return None
        reflection = method_path.startswith(_REFLECTION_PREFIX)
        if reflection and self.reflection == "open":
            return None
        if self.keys is None:
            return None
        key = presented_key(metadata)
        if key is None:
            return Unauthenticated("an API key is required: metadata 'authorization: Bearer <key>' or 'x-api-key'")
        entry = self.keys.lookup(key)
        if entry is None:
            return Unauthenticated("the API key is not valid")
        structlog.contextvars.bind_contextvars(api_key_name=entry.name)
        service = method_path.lstrip("/").partition("/")[0]
        if not reflection and not entry.may_call(service):
            return PermissionDenied(f"the API key {entry.name!r} may not call {service}")
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method_path = handler_call_details.method
        if method_path.startswith(_REFLECTION_PREFIX) and self.reflection == "off":
            return _aborting(handler, grpc.StatusCode.UNIMPLEMENTED, "server reflection is off (--reflection)")
        error = self.check(method_path, handler_call_details.invocation_metadata)
        if error is None:
            return handler
        if method_path.startswith(_REFLECTION_PREFIX):  # not guarded by the gateway's interceptor
            return _aborting(handler, error.code, error.message)
        _REFUSAL.set(error)
        return _raising(handler, error)


def raise_refusal() -> None:
    """Raises this call's UNAUTHENTICATED / PERMISSION_DENIED, if it has one: lets the gateway's
    scope refuse before admission, so a refused caller never holds or waits for a permit."""
    error = _REFUSAL.get()
    if error is not None:
        raise error


def _raising(handler: grpc.RpcMethodHandler, error: RagserveError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that raises `error` (the gateway's interceptor maps it).
    The request is not parsed: a refused caller costs no deserialisation."""

    async def unary(request, context):
        raise error

    async def streaming(request, context):
        raise error
        yield  # an async generator, like the handler it stands for

    return _same_kind(handler, unary, streaming)


def _aborting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield

    return _same_kind(handler, unary, streaming)


def _same_kind(handler: grpc.RpcMethodHandler, unary, streaming) -> grpc.RpcMethodHandler:
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serializer)


def auth_interceptors(api_keys_file: str, reflection: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors to append after the gateway's: none when everything is open."""
    if not api_keys_file and reflection == "open":
        return []
    if not api_keys_file and reflection == "keyed":
        raise ValueError("--reflection keyed needs --api-keys-file")
    keys = KeyStore(api_keys_file, KEYED_SERVICES) if api_keys_file else None
    return [AuthInterceptor(keys, reflection)]
