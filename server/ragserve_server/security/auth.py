"""API-key authentication and per-service permission: a plain check of (service, headers).

    auth = Authenticator(KeyStore(path, KEYED_SERVICES))
    outcome = auth.check("ragserve.v1.Embed", headers)   # an Identity, or the refusal to raise

A caller sends its key as `authorization: Bearer <key>` or `x-api-key: <key>` (gRPC metadata
or HTTP headers: any mapping with lower-case names, or (name, value) pairs). No key or an
unknown one is UNAUTHENTICATED, a key whose entry does not list the service
PERMISSION_DENIED. The call guard of each front (calls/call_scope.py) runs the check before
anything else is done for the call: the refusal is then mapped, counted and logged like any
other. Health is never guarded; reflection (not a guarded call) has its own gate here,
`gate_reflection` (open, keyed or off). Keys never reach the log: the
identity carries the key's name only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from ragserve_server.errors import PermissionDenied, RagserveError, Unauthenticated
from ragserve_server.security.keys import KEYED_SERVICES, SERVICES, ApiKey, KeyStore

__all__ = ["Authenticator", "Identity", "KEYED_SERVICES", "REFLECTION_MODES", "gate_reflection", "presented_key"]

REFLECTION_MODES = ("open", "keyed", "off")


@dataclass(frozen=True)
class Identity:
    """Who is calling: `key` None when the gateway needs no keys."""

    key: ApiKey | None = None

    @property
    def name(self) -> str | None:
        return self.key.name if self.key is not None else None


ANONYMOUS = Identity()


def presented_key(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> str | None:
    """The caller's key from `authorization: Bearer <key>` (first) or `x-api-key`."""
    if headers is None:
        return None
    if not hasattr(headers, "get"):
        pairs = list(headers)
        headers = {name: value for name, value in reversed(pairs) if isinstance(value, str)}  # the first wins
    authorization = headers.get("authorization")
    if isinstance(authorization, str):
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if isinstance(api_key, str) and api_key.strip() else None


class Authenticator:
    """`keys` None: every call is open."""

    def __init__(self, keys: KeyStore | None, reflection: str = "open") -> None:
        if reflection not in REFLECTION_MODES:
            raise ValueError(f"--reflection {reflection!r}: use one of {', '.join(REFLECTION_MODES)}")
        if keys is None and reflection == "keyed":
            raise ValueError("--reflection keyed needs --api-keys-file")
        self.keys = keys
        self.reflection = reflection

    @classmethod
    def from_settings(cls, api_keys_file: str, reflection: str) -> "Authenticator":
        """Raises KeysFileError (a ValueError) for a keys file that cannot be read."""
        if not api_keys_file and reflection == "keyed":
            raise ValueError("--reflection keyed needs --api-keys-file")
        return cls(KeyStore(api_keys_file, KEYED_SERVICES) if api_keys_file else None, reflection)

    def check(self, service: str, headers) -> Identity | RagserveError:
        """`service`: a full gRPC service name (or a short one: "Embed"); `service=None`
        asks only for a valid key (reflection)."""
        if self.keys is None:
            return ANONYMOUS
        key = presented_key(headers)
        if key is None:
            return Unauthenticated("an API key is required: 'authorization: Bearer <key>' or 'x-api-key'")
        entry = self.keys.lookup(key)
        if entry is None:
            return Unauthenticated("the API key is not valid")
        if service is not None:
            service = SERVICES.get(service, service)
            if not entry.may_call(service):
                refusal = PermissionDenied(f"the API key {entry.name!r} may not call {service}")
                refusal.key_name = entry.name  # the access log names the key of a refused call too
                return refusal
        return Identity(entry)


def _aborting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def streaming(request, context):
        await context.abort(code, message)
        yield

    async def unary(request, context):
        await context.abort(code, message)

    serializer = handler.response_serializer
    if handler.stream_stream:  # reflection's one method
        return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serializer)


def gate_reflection(handler: grpc.RpcMethodHandler, auth: Authenticator) -> grpc.RpcMethodHandler:
    """Reflection's method handler behind `auth.reflection` (open, keyed: any valid key, off:
    UNIMPLEMENTED), wrapped once at start-up as the gateway's methods are (transport/grpc_methods.py)."""
    if auth.reflection == "open":
        return handler
    if auth.reflection == "off":
        return _aborting(handler, grpc.StatusCode.UNIMPLEMENTED, "server reflection is off (--reflection)")
    inner = handler.stream_stream

    async def keyed(request_iterator, context):
        outcome = auth.check(None, context.invocation_metadata())
        if isinstance(outcome, RagserveError):
            await context.abort(outcome.code, outcome.message)
        async for response in inner(request_iterator, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(
        keyed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
