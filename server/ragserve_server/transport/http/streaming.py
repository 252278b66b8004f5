"""One HTTP call, answered over ASGI: key check, the body under limits, the call guard, the answer.

The order is the point (each step is cheaper than the next, and none is done for a caller
the previous one refused):

1. the key (security/auth.py, the same check as gRPC's), before a byte of the body is read:
   an unauthenticated caller costs a header lookup and a hash;
2. the body: `Content-Type: application/json` (415), `Content-Length` and the bytes actually
   received against `max_body_bytes` (413), the whole body within `receive_timeout` (408),
   then the JSON parse (any failure, deep nesting included, 400); all before an admission
   permit is taken, so a slow or large upload never holds one;
3. the call guard's scope (admission, error table, metrics, access log) and the route's work;
4. JSON, or server-sent events for a stream (errors after the first event become its last one).

Deadline: a caller may send `x-request-timeout: <seconds>` (a positive decimal, e.g. `30` or
`2.5`; anything else is a 400). It becomes the call's deadline, counted from the request's
arrival, as gRPC's `grpc-timeout` does: the services get the time left (so it reaches Triton as
the request's timeout), and when it is spent the call's work is cancelled (in the engine too)
and answered 504 DEADLINE_EXCEEDED (`timeout_error`, code `deadline`), or, for a stream already
under way, with that error as its last event. Without the header a call has no deadline.

Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`code`: the
rejection reason of the metrics), with the HTTP status of the gRPC code (or of the body's
refusal: 408, 413, 415); a 429 carries `Retry-After` (whole seconds, at least 1) and
`retry-after-ms` (the hint itself, which the openai client honours).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable

import grpc
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ragserve_server.calls.call_scope import CallFailed, CallGuard, request_id_or_new
from ragserve_server.errors import DeadlineExceeded, InvalidInput, RagserveError
from ragserve_server.observability import tracing

# gRPC code -> HTTP status and OpenAI error type.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
JSON = "application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class BodyRefused(InvalidInput):
    """A request body refused before it is parsed; `status` is its HTTP status (INVALID_ARGUMENT
    over the error table, so metrics and logs count it with the other bad input)."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


# Rejection reason -> HTTP status, for the refusals with no gRPC code of their own.
_STATUS_OF_REASON = {"body_too_large": 413, "unsupported_media_type": 415, "body_timeout": 408}

TIMEOUT_HEADER = "x-request-timeout"
_MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: beyond it the header is a mistake, not a deadline


def request_timeout(headers) -> float | None:
    """The caller's `x-request-timeout` in seconds (None without the header), or InvalidInput."""
    given = headers.get(TIMEOUT_HEADER)
    if given is None:
        return None
    try:
        seconds = float(given.strip())
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _MAX_TIMEOUT_S:  # NaN, inf, 0 and negatives too
        shown = given if len(given) <= 32 else given[:32] + "..."
        raise InvalidInput(f"{TIMEOUT_HEADER} must be a number of seconds above 0 and at most {_MAX_TIMEOUT_S:g} (e.g. 30 or 2.5), not {shown!r}")
    return seconds


class Deadline:
    """One HTTP call's deadline on the event loop's clock (`at` None: none)."""

    def __init__(self, timeout: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.at = None if timeout is None else self.loop.time() + timeout

    def time_left(self) -> float | None:
        """Seconds left (0 once spent), None without a deadline: what the services take as `timeout`."""
        return None if self.at is None else max(0.0, self.at - self.loop.time())

    def passed(self) -> bool:
        return self.at is not None and self.loop.time() >= self.at

    def message(self) -> str:
        return f"deadline exceeded: the call's {TIMEOUT_HEADER} of {self.timeout:g} s passed"

    def check(self) -> None:
        """Nothing is answered once the deadline has passed, even what the work produced at that
        moment (Triton, given the same deadline, may end a generation as cancelled just then)."""
        if self.passed():
            raise DeadlineExceeded(self.message())

    def exceeded(self, request_id: str) -> CallFailed:
        return CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, self.message(), "deadline", None, request_id)


def dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(code: grpc.StatusCode, message: str, reason: str) -> tuple[int, dict]:
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    status = _STATUS_OF_REASON.get(reason, status)
    return status, {"error": {"message": message, "type": kind, "param": None, "code": reason}}


def failure_headers(failed: CallFailed) -> list[tuple[bytes, bytes]]:
    if failed.retry_after is None:
        return []
    return [
        (b"retry-after", str(max(1, math.ceil(failed.retry_after))).encode()),
        (b"retry-after-ms", str(max(1, round(failed.retry_after * 1000))).encode()),
    ]


class BodyLimits:
    def __init__(self, max_bytes: int, receive_timeout: float) -> None:
        self.max_bytes = max_bytes
        self.receive_timeout = receive_timeout

    async def read_json(self, request: Request) -> dict:
        """The request's JSON object, or BodyRefused / InvalidInput."""
        if request.method == "GET":
            return {}
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != JSON:
            raise BodyRefused(f"Content-Type must be {JSON}, not {media_type or 'missing'!r}", 415, "unsupported_media_type")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise BodyRefused(f"request body of {length} bytes exceeds {self.max_bytes} (--max-http-body-bytes)", 413, "body_too_large")
        # uvicorn bounds idle keep-alive connections and our protocol (server.py) the headers,
        # but nothing in uvicorn bounds how long a body may take to arrive: a caller sending a
        # byte a second would hold its connection (and, before this, a permit) forever. The
        # deadline lives here, where the body is read.
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.receive_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise BodyRefused(f"request body exceeds {self.max_bytes} bytes (--max-http-body-bytes)", 413, "body_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyRefused(f"request body not received within {self.receive_timeout:g} s", 408, "body_timeout") from None
        except ClientDisconnect:
            raise BodyRefused("the caller left while sending the body", 400, "body_incomplete") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else f"not valid JSON: {exc}"
            raise InvalidInput(f"request body is {what}") from None
        if not isinstance(body, dict):
            raise InvalidInput("request body must be a JSON object")
        return body


class CallResponse(Response):
    """Runs one call in the request's own task (so the scope's context stays in one task) and
    answers it. `method_of(body)` -> (method label, streaming); `run(body, call, deadline)` -> a
    dict, or an async iterator of dicts when streaming; `deadline.time_left()` is the services'
    `timeout`."""

    def __init__(self, guard: CallGuard, limits: BodyLimits, request: Request, service: str, method_of: Callable, run) -> None:
        self.guard = guard
        self.limits = limits
        self.request = request
        self.service = service
        self.method_of = method_of
        self.run = run
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        request = self.request
        request_id = request_id_or_new(request.headers.get("x-request-id"))
        headers = [(b"x-request-id", request_id.encode())]
        deadline = Deadline(None)  # counted from the request's arrival (here)
        identity = self.guard.authenticate(self.service, request.headers)
        body, refused = {}, None
        if not isinstance(identity, RagserveError):
            try:
                deadline = Deadline(request_timeout(request.headers))
                body = await self.limits.read_json(request)
            except RagserveError as exc:
                refused = exc
        method, streaming = self.method_of(body)
        started, watcher = False, None
        call = self.guard.scope(
            self.service, method, request_id,
            identity=identity,
            admit=refused is None,  # a refused body takes no permit
            deadline_passed=deadline.passed,
            carrier=dict(request.headers) if tracing.enabled() else None,
            span_name=f"{request.method} {request.url.path}",
            log_fields={"transport": "http"},
        )
        try:
            try:
                # A spent deadline cancels the work inside the scope (which records it as
                # DEADLINE_EXCEEDED: deadline_passed) and is answered 504 below.
                async with asyncio.timeout_at(deadline.at):
                    async with call:
                        if refused is not None:
                            raise refused
                        if not streaming:
                            answer = await self.run(body, call, deadline)
                            deadline.check()
                            payload = dumps(answer)
                        else:
                            events = self.run(body, call, deadline)
                            try:
                                item = await anext(events)  # the call's errors before any output still get a status
                                deadline.check()
                                watcher = _Watcher(receive)
                                await send({"type": "http.response.start", "status": 200, "headers": headers + _SSE_HEADERS})
                                started = True
                                while item is not None:
                                    await send({"type": "http.response.body", "body": b"data: " + dumps(item) + b"\n\n", "more_body": True})
                                    item = await anext(events, None)
                                    if item is not None:
                                        deadline.check()
                            finally:
                                await events.aclose()  # here, in the call's context (its stage spans end here)
            except TimeoutError:
                if not deadline.passed():
                    raise  # not the deadline's (the scope maps the services' own errors)
                raise deadline.exceeded(call.request_id) from None
            if not streaming:
                await send({"type": "http.response.start", "status": 200, "headers": headers + [(b"content-type", JSON.encode())]})
                await send({"type": "http.response.body", "body": payload})
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        except CallFailed as failed:
            status, error = error_body(failed.code, failed.message, failed.reason)
            if started:  # a stream already under way: the error is its last event
                await send({"type": "http.response.body", "body": b"data: " + dumps(error) + b"\n\ndata: [DONE]\n\n", "more_body": True})
            else:
                extra = failure_headers(failed) + [(b"content-type", JSON.encode())]
                if refused is not None or isinstance(identity, RagserveError):
                    extra.append((b"connection", b"close"))  # an unread or refused body: no keep-alive
                await send({"type": "http.response.start", "status": status, "headers": headers + extra})
                await send({"type": "http.response.body", "body": dumps(error)})
        except asyncio.CancelledError:
            if watcher is None or not watcher.disconnected:
                raise
            asyncio.current_task().uncancel()  # the caller left: nothing more to send
            return
        finally:
            if watcher is not None:
                watcher.stop()
        if started:  # the end of the stream, once nothing can cancel this task any more
            await send({"type": "http.response.body", "body": b""})


class _Watcher:
    def __init__(self, receive) -> None:
        self.disconnected = False
        self._owner = asyncio.current_task()
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._owner is not None:
            self.disconnected = True
            self._owner.cancel()  # leaving the generation cancels the Triton request

    def stop(self) -> None:
        self._task.cancel()
        self._owner = None
