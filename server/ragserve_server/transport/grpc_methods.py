"""The gateway's gRPC methods, each wrapped once at start-up: request id, key check, admission, errors, log.

    methods = GatewayMethods(guard, max_open_streams=64, auth=auth)
    embed_pb2_grpc.add_EmbedServicer_to_server(embed, methods)  # any generated add_*_to_server
    methods.add_reflection(service_names)  # behind --reflection (open, keyed, off)
    methods.install(server)  # one generic handler: a dict lookup per call

Every guarded call, whatever its kind (unary, server stream, bidirectional stream), goes
through the same steps: take the `x-request-id` (or make one; one that is not a short plain
token is replaced, as over HTTP) and send it back; check the caller's key (before the request
message is parsed: a refused caller costs no deserialisation); bind the id with the service
and method to structlog's context; take an admission permit (RESOURCE_EXHAUSTED at once when
full); run the handler; map a typed error to its status code exactly once; hand the
per-request record to the metrics module and write one access log line. Those steps are
call_scope.CallGuard's, shared with the HTTP front (transport/http/); this module says how
their outcome travels over gRPC (metadata, trailers, the status). An EmbedStream takes a
permit per message; the stream itself counts against `max_open_streams`.

Why wrappers and not a `grpc.aio.ServerInterceptor`: an interceptor runs per call through
grpc.aio's interceptor pipeline and builds a new method handler (closures, a handler tuple)
for every call. Here each method's wrapper is built once, when the servicer is registered: it
knows its service and method names, its kind and its lane rule, and takes the raw request
bytes (no deserializer in gRPC), so that it can check the key before parsing them. Health is
served unguarded next to these (added to the server itself); reflection is gated here.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from ragserve_server.calls.admission import BULK, INTERACTIVE
from ragserve_server.calls.call_scope import CallFailed, CallGuard, request_id_or_new
from ragserve_server.errors import Cancelled, DeadlineExceeded, InvalidInput, Overloaded, RagserveError
from ragserve_server.observability import tracing
from ragserve_server.security.auth import Authenticator, gate_reflection
from ragserve_server.transport.pushback import retry_trailers

# Streams whose messages each take a permit (in the service), not the stream as a whole.
PER_MESSAGE_ADMISSION = {"EmbedStream"}
_PRIORITY_BULK = 2  # ragserve.v1.Priority.PRIORITY_BULK
_PARSE_ERRORS = (DecodeError, ValueError, UnicodeDecodeError)


def lane_of(request) -> str:
    """The admission lane a request asks for (its `priority` field, where it has one)."""
    return BULK if getattr(request, "priority", 0) == _PRIORITY_BULK else INTERACTIVE


class Undecodable:
    """Stands in for a request message that failed to parse (e.g. a string that is not UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def invalid(self) -> InvalidInput:
        return InvalidInput(f"request message could not be parsed (strings must be valid UTF-8): {self.error}")


def _parsed(parse: Callable, raw: bytes):
    try:
        return parse(raw)
    except _PARSE_ERRORS as exc:
        return Undecodable(exc)


class _MethodTable(grpc.GenericRpcHandler):
    """grpc.aio asks each generic handler per call: here one dict lookup by the method's path."""

    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers

    def service(self, handler_call_details):
        return self.handlers.get(handler_call_details.method)


class GatewayMethods:
    """Collects the wrapped methods: pass it as the `server` of generated `add_*_to_server`."""

    def __init__(self, guard: CallGuard, *, max_open_streams: int = 0, auth: Authenticator | None = None) -> None:
        self.guard = guard
        self.auth = auth  # reflection's gate (None: reflection open)
        self.max_open_streams = max_open_streams  # EmbedStreams open at once; 0 = no bound
        self.open_streams = 0
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._registered: set[str] = set()
        self._generic: set[str] = set()

    # The two calls generated `add_*Servicer_to_server` code makes on its server.
    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        short = service.rsplit(".", 1)[-1]
        for method, handler in method_handlers.items():
            self.handlers[f"/{service}/{method}"] = self.wrap(short, method, handler)
        self._registered.add(service)

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        # The same methods as add_registered_method_handlers (checked in `install`).
        self._generic.update(h.service_name() if hasattr(h, "service_name") else repr(h) for h in generic_handlers)

    def add_reflection(self, service_names) -> None:
        """Server reflection, unguarded but behind --reflection (security/auth.gate_reflection)."""
        from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

        collected = _Collected()
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(service_names), collected)
        for path, handler in collected.handlers.items():
            self.handlers[path] = gate_reflection(handler, self.auth) if self.auth is not None else handler

    def install(self, server: grpc.aio.Server) -> None:
        if unwrapped := self._generic - self._registered:
            raise RuntimeError(f"services registered without add_registered_method_handlers, so not guarded: {sorted(unwrapped)}")
        server.add_generic_rpc_handlers((_MethodTable(self.handlers),))

    def wrap(self, service: str, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` guarded; it gets raw bytes from gRPC and parses them after the key check."""
        parse = handler.request_deserializer or (lambda raw: raw)
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary_unary(service, method, handler.unary_unary, parse), response_serializer=serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(service, method, handler.unary_stream, parse), response_serializer=serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._stream_stream(service, method, handler.stream_stream, parse), response_serializer=serializer)
        raise ValueError(f"{service}/{method}: client-streaming methods are not guarded by the gateway")

    def _unary_unary(self, service: str, method: str, inner, parse):
        guard = self.guard

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext):
            metadata = dict(context.invocation_metadata() or ())
            identity = guard.authenticate(service, metadata)
            request = None if isinstance(identity, RagserveError) else _parsed(parse, raw)  # refused: never parsed
            request_id = request_id_or_new(metadata.get("x-request-id"))
            # The id goes back in the trailing metadata of a unary call: sent with the status,
            # no extra send on the hot path.
            trailing = (("x-request-id", request_id),)
            context.set_trailing_metadata(trailing)
            try:
                async with guard.scope(
                    service, method, request_id, lane=lane_of(request), identity=identity,
                    deadline_passed=_deadline_check(context), carrier=metadata if tracing.enabled() else None,
                ):
                    if request.__class__ is Undecodable:
                        raise request.invalid()
                    return await inner(request, context)
            except CallFailed as failed:
                await _abort(context, failed, trailing)

        return unary_unary

    def _unary_stream(self, service: str, method: str, inner, parse):
        guard = self.guard

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext):
            metadata = dict(context.invocation_metadata() or ())
            identity = guard.authenticate(service, metadata)
            request = None if isinstance(identity, RagserveError) else _parsed(parse, raw)
            request_id = request_id_or_new(metadata.get("x-request-id"))
            trailing = (("x-request-id", request_id),)
            try:
                async with guard.scope(
                    service, method, request_id, identity=identity, deadline_passed=_deadline_check(context),
                    carrier=metadata if tracing.enabled() else None, enter=_initial_metadata(context, trailing),
                ):
                    if request.__class__ is Undecodable:
                        raise request.invalid()
                    async for response in inner(request, context):
                        yield response
            except CallFailed as failed:
                await _abort(context, failed, trailing)

        return unary_stream

    def _stream_stream(self, service: str, method: str, inner, parse):
        guard = self.guard
        per_message = int(method in PER_MESSAGE_ADMISSION)

        async def messages(request_iterator):
            async for raw in request_iterator:
                message = _parsed(parse, raw)
                if message.__class__ is Undecodable:
                    raise message.invalid()
                yield message

        async def stream_stream(request_iterator, context: grpc.aio.ServicerContext):
            metadata = dict(context.invocation_metadata() or ())
            identity = guard.authenticate(service, metadata)
            request_id = request_id_or_new(metadata.get("x-request-id"))
            trailing = (("x-request-id", request_id),)
            try:
                async with guard.scope(
                    service, method, request_id, lane=BULK, admit=not per_message, identity=identity,
                    deadline_passed=_deadline_check(context), carrier=metadata if tracing.enabled() else None,
                    enter=_initial_metadata(context, trailing),
                ):
                    if per_message and self.max_open_streams and self.open_streams >= self.max_open_streams:
                        raise Overloaded(f"{self.open_streams} {method} streams are open, the most this gateway keeps (--max-open-streams)")
                    self.open_streams += per_message
                    try:
                        async for response in inner(messages(request_iterator), context):
                            yield response
                    finally:
                        self.open_streams -= per_message
            except CallFailed as failed:
                await _abort(context, failed, trailing)

        return stream_stream


class _Collected:
    """A stand-in server for generated `add_*_to_server` code: keeps its handlers by path."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_registered_method_handlers(self, service: str, method_handlers) -> None:
        self.handlers.update({f"/{service}/{method}": handler for method, handler in method_handlers.items()})

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        pass


def _deadline_check(context: grpc.aio.ServicerContext) -> Callable[[], bool]:
    """Tells a spent deadline from a caller's cancel (read only when a call is cancelled)."""

    def deadline_passed() -> bool:
        remaining = context.time_remaining()
        return remaining is not None and remaining <= 0

    return deadline_passed


def _initial_metadata(context: grpc.aio.ServicerContext, request_id_metadata):
    """A stream sends the request id in its initial metadata: the caller sees it at once."""

    async def send() -> None:
        try:
            await context.send_initial_metadata(request_id_metadata)
        except Exception as exc:
            # gRPC's ExecuteBatchError (a private class): the call ended before its first
            # send, its deadline spent or its caller gone. The caller's doing, not INTERNAL.
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("deadline exceeded before the stream started") from exc
            raise Cancelled("the call ended before the stream started") from exc

    return send


async def _abort(context: grpc.aio.ServicerContext, failed: CallFailed, request_id_metadata) -> None:
    """The one place a status other than OK is set (the guard logged and counted it)."""
    extra = () if failed.retry_after is None else retry_trailers(failed.code, failed.message, failed.retry_after)
    await context.abort(failed.code, failed.message, trailing_metadata=request_id_metadata + extra)
