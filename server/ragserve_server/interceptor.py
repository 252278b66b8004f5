"""The gateway's one server interceptor: request id and log context, admission, error mapping.

Every call, whatever its kind (unary, server stream, bidirectional stream), goes through
the same steps: take the `x-request-id` (or make one) and send it back; bind it with the
service and method to structlog's context; take an admission permit (RESOURCE_EXHAUSTED
at once when full); run the handler; map a typed error to its status code exactly once;
hand the per-request record to the metrics module and write one access log line.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager

import grpc
import structlog
from google.protobuf.message import DecodeError

from ragserve_server import auth, request_record
from ragserve_server.admission import BULK, CURRENT_LANE, INTERACTIVE, Admission
from ragserve_server.errors import InvalidInput, Overloaded, RagserveError, status_of
from ragserve_server.pushback import retry_trailers
from ragserve_server.request_record import RequestRecord

log = structlog.get_logger("ragserve.access")

# Not subject to admission or access logs: health checks and reflection.
_UNGUARDED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# Streams whose messages each take a permit (in the service), not the stream as a whole.
PER_MESSAGE_ADMISSION = {"EmbedStream"}
_PRIORITY_BULK = 2  # ragserve.v1.Priority.PRIORITY_BULK


def lane_of(request) -> str:
    """The admission lane a request asks for (its `priority` field, where it has one)."""
    return BULK if getattr(request, "priority", 0) == _PRIORITY_BULK else INTERACTIVE


class Undecodable:
    """Stands in for a request message that failed to parse (e.g. a string that is not UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def invalid(self) -> InvalidInput:
        return InvalidInput(f"request message could not be parsed (strings must be valid UTF-8): {self.error}")


def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Undecodable(exc)

    return parse


async def _checked_messages(request_iterator):
    async for message in request_iterator:
        if isinstance(message, Undecodable):
            raise message.invalid()
        yield message


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        admission: Admission,
        on_finish: Callable[[RequestRecord, str], None] | None = None,
        on_start: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.admission = admission
        self.on_finish = on_finish or (lambda record, code: None)
        self.on_start = on_start or (lambda record: None)  # in-flight gauges need the start too

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or method_path.startswith(_UNGUARDED_PREFIXES):
            return handler
        service, _, method = method_path.lstrip("/").rpartition("/")
        service = service.rsplit(".", 1)[-1]
        metadata = dict(handler_call_details.invocation_metadata or ())
        deserializer = _safe_deserializer(handler.request_deserializer)
        call = _Call(self, service, method, metadata.get("x-request-id"))

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
                async with call.scope(context, admit=method not in PER_MESSAGE_ADMISSION, lane=BULK):
                    async for response in inner(_checked_messages(request_iterator), context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        return handler  # stream_unary: not used by ragserve.v1


class _Call:
    """One intercepted call: its identity and the scope every kind of handler runs in."""

    def __init__(self, interceptor: GatewayInterceptor, service: str, method: str, request_id: str | None) -> None:
        self.interceptor = interceptor
        self.service = service
        self.method = method
        self.request_id = request_id or uuid.uuid4().hex

    @asynccontextmanager
    async def scope(
        self, context: grpc.aio.ServicerContext, streaming: bool = True, lane: str = INTERACTIVE, admit: bool = True
    ):
        """The request id goes back in the initial metadata of a stream (the caller sees it
        at once) and in the trailing metadata of a unary call (sent with the status: no
        extra send on the hot path)."""
        record = RequestRecord(self.service, self.method, self.request_id)
        structlog.contextvars.bind_contextvars(request_id=self.request_id, service=self.service, method=self.method)
        token = request_record.start(record)
        self.interceptor.on_start(record)
        admission = self.interceptor.admission
        admitted = None  # the permit's start time once taken
        lane = admission.lane_for(lane)
        lane_token = CURRENT_LANE.set(lane)
        code, message = grpc.StatusCode.OK, ""
        request_id_metadata = (("x-request-id", self.request_id),)
        extra_trailers: tuple = ()
        try:
            if streaming:
                await context.send_initial_metadata(request_id_metadata)
            else:
                context.set_trailing_metadata(request_id_metadata)
            auth.raise_refusal()  # a caller without a valid key never takes or waits for a permit
            if admit:
                with request_record.stage("admission"):
                    admitted = admission.acquire(lane)
            yield
        except RagserveError as exc:
            code, message = status_of(exc)
            record.error_reason = exc.reason
            if isinstance(exc, Overloaded):
                # Every RESOURCE_EXHAUSTED carries a retry hint computed from the load.
                retry_after = exc.retry_after if exc.retry_after is not None else admission.hint(lane)
                extra_trailers = retry_trailers(code, message, retry_after)
                log.info("rpc_rejected", code=code.name, error=message, retry_after_ms=round(retry_after * 1000))
            else:
                log.info("rpc_rejected", code=code.name, error=message)
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away, or its deadline passed (gRPC cancels the handler then too).
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code, record.error_reason = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"
            else:
                code = grpc.StatusCode.CANCELLED  # the caller's choice: not a rejection
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: logged once with its cause, answered INTERNAL
            code, message = status_of(exc)
            record.error_reason = "internal"
            log.error("rpc_failed", code=code.name, exc_info=exc)
        finally:
            CURRENT_LANE.reset(lane_token)
            if admitted is not None:
                admission.release(lane, admitted)
            duration = record.duration = time.perf_counter() - record.started
            log.info(
                "rpc",
                status=code.name,
                duration_ms=round(duration * 1000, 3),
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )
            self.interceptor.on_finish(record, code.name)
            request_record.finish(token)
            structlog.contextvars.unbind_contextvars("request_id", "service", "method")
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message, trailing_metadata=request_id_metadata + extra_trailers)  # the one place a status is set
