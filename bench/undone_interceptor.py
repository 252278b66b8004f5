"""Undone (issue 23): the gateway's generic grpc.aio server interceptor, as it was before each
method was wrapped once at start-up (server/ragserve_server/transport/grpc_methods.py). Kept
only so that `bench/gateway_floor_server.py --undo interceptor` can measure that change.

The gateway's one server interceptor: request id and log context, admission, error mapping.

Every call, whatever its kind (unary, server stream, bidirectional stream), goes through
the same steps: take the `x-request-id` (or make one; one that is not a short plain token is
replaced, as over HTTP) and send it back; check the caller's key (before the request message
is parsed: a refused caller costs no deserialisation); bind the id with the service and method
to structlog's context; take an admission permit (RESOURCE_EXHAUSTED
at once when full); run the handler; map a typed error to its status code exactly once;
hand the per-request record to the metrics module and write one access log line. Those
steps are call_scope.CallGuard's, shared with the HTTP front (transport/http/); this module
says how their outcome travels over gRPC (metadata, trailers, the status). An EmbedStream
takes a permit per message; the stream itself counts against `max_open_streams`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

import grpc
from google.protobuf.message import DecodeError

from ragserve_server.observability import tracing
from ragserve_server.calls.admission import BULK, INTERACTIVE, Admission
from ragserve_server.calls.call_scope import CallFailed, CallGuard, request_id_or_new
from ragserve_server.errors import Cancelled, DeadlineExceeded, Overloaded, RagserveError
from ragserve_server.transport.grpc_methods import PER_MESSAGE_ADMISSION, Undecodable, lane_of
from ragserve_server.transport.pushback import retry_trailers
from ragserve_server.observability.request_record import RequestRecord

# Not subject to admission or access logs: health checks and reflection.
_UNGUARDED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Undecodable(exc)

    return parse


def _skip(data: bytes) -> None:
    return None


async def _checked_messages(request_iterator):
    async for message in request_iterator:
        if isinstance(message, Undecodable):
            raise message.invalid()
        yield message


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        admission: Admission | CallGuard,
        on_finish: Callable[[RequestRecord, str], None] | None = None,
        on_start: Callable[[RequestRecord], None] | None = None,
        max_open_streams: int = 0,
    ) -> None:
        self.guard = admission if isinstance(admission, CallGuard) else CallGuard(admission, on_finish, on_start)
        self.admission = self.guard.admission
        self.max_open_streams = max_open_streams  # EmbedStreams open at once; 0 = no bound
        self.open_streams = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or method_path.startswith(_UNGUARDED_PREFIXES):
            return handler
        service, _, method = method_path.lstrip("/").rpartition("/")
        service = service.rsplit(".", 1)[-1]
        metadata = dict(handler_call_details.invocation_metadata or ())
        identity = self.guard.authenticate(service, metadata)
        if isinstance(identity, RagserveError):
            deserializer = _skip if handler.request_deserializer is not None else None  # refused: never parsed
        else:
            deserializer = _safe_deserializer(handler.request_deserializer)
        call = _Call(self.guard, service, method, metadata.get("x-request-id"), metadata if tracing.enabled() else None, identity)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                async with call.scope(context, streaming=False, lane=lane_of(request)):
                    if isinstance(request, Undecodable):
                        raise request.invalid()
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                async with call.scope(context):
                    if isinstance(request, Undecodable):
                        raise request.invalid()
                    async for response in inner(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.stream_stream:
            inner = handler.stream_stream

            async def stream_stream(request_iterator, context):
                per_message = method in PER_MESSAGE_ADMISSION
                async with call.scope(context, admit=not per_message, lane=BULK):
                    if per_message and self.max_open_streams and self.open_streams >= self.max_open_streams:
                        raise Overloaded(f"{self.open_streams} {method} streams are open, the most this gateway keeps (--max-open-streams)")
                    self.open_streams += per_message
                    try:
                        async for response in inner(_checked_messages(request_iterator), context):
                            yield response
                    finally:
                        self.open_streams -= per_message

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        return handler  # stream_unary: not used by ragserve.v1


class _Call:
    """One intercepted call: its identity and the scope every kind of handler runs in."""

    def __init__(self, guard: CallGuard, service: str, method: str, request_id: str | None, carrier=None, identity=None) -> None:
        self.guard = guard
        self.service = service
        self.method = method
        self.request_id = request_id_or_new(request_id)
        self.carrier = carrier  # the caller's metadata, for its traceparent (tracing on)
        self.identity = identity  # the key check's outcome (guard.authenticate)

    @asynccontextmanager
    async def scope(
        self, context: grpc.aio.ServicerContext, streaming: bool = True, lane: str = INTERACTIVE, admit: bool = True
    ):
        """The request id goes back in the initial metadata of a stream (the caller sees it
        at once) and in the trailing metadata of a unary call (sent with the status: no
        extra send on the hot path)."""
        request_id_metadata = (("x-request-id", self.request_id),)

        def deadline_passed() -> bool:
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        async def send_request_id() -> None:
            if not streaming:
                context.set_trailing_metadata(request_id_metadata)
                return
            try:
                await context.send_initial_metadata(request_id_metadata)
            except Exception as exc:
                # gRPC's ExecuteBatchError (a private class): the call ended before its first
                # send, its deadline spent or its caller gone. The caller's doing, not INTERNAL.
                if deadline_passed():
                    raise DeadlineExceeded("deadline exceeded before the stream started") from exc
                raise Cancelled("the call ended before the stream started") from exc

        try:
            async with self.guard.scope(
                self.service,
                self.method,
                self.request_id,
                lane=lane,
                admit=admit,
                identity=self.identity,
                deadline_passed=deadline_passed,
                carrier=self.carrier,
                enter=send_request_id,
            ):
                yield
        except CallFailed as failed:
            extra = () if failed.retry_after is None else retry_trailers(failed.code, failed.message, failed.retry_after)
            await context.abort(failed.code, failed.message, trailing_metadata=request_id_metadata + extra)  # the one place a status is set
