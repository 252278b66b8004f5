"""What every call goes through, whatever its transport (gRPC or HTTP).

    guard = CallGuard(admission, auth=Authenticator(keys), on_finish=metrics.call_finished, on_start=metrics.call_started)
    try:
        async with guard.scope("Embed", "Embed", request_id, headers=incoming_headers) as call:
            ...  # the service's work
    except CallFailed as failed:
        ...  # the transport answers failed.code / failed.message (and failed.retry_after)

The scope binds the request id, service and method to structlog's context and opens the
per-request record (metrics, access log); it checks the caller's key first (security/auth.py:
a plain check of the service and the headers, the same for both fronts; a front may run it
earlier with `guard.authenticate` and pass the outcome as `identity`), then the key's quota
(security/quotas.py); only then does it open the call's span (a child of the caller's
`traceparent`; inbound baggage is dropped) and take an admission permit (RESOURCE_EXHAUSTED at once when the lane is full), maps a typed error to
its status exactly once (errors.status_of), and writes one access log line. A failure leaves
the scope as `CallFailed` after everything is recorded; a cancelled call (the caller left or
its deadline passed) re-raises the cancellation. The transports only say how the outcome
reaches the caller.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Mapping

import grpc
import structlog

from ragserve_server.observability import request_record, tracing
from ragserve_server.calls.admission import CURRENT_LANE, INTERACTIVE, Admission
from ragserve_server.errors import Overloaded, RagserveError, status_of
from ragserve_server.observability.request_record import RequestRecord
from ragserve_server.security.auth import ANONYMOUS, Authenticator, Identity
from ragserve_server.security.quotas import KeyQuotas

# The only inbound headers a span is built from: W3C trace context. Baggage is dropped (it
# would travel on to Triton and into every span, set by any caller).
_TRACE_HEADERS = ("traceparent", "tracestate")

log = structlog.get_logger("ragserve.access")


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_or_new(given: str | None) -> str:
    """The caller's `x-request-id` when it is a short plain token, else a new one: an id
    reaches every log line and span, so 8 KiB ids or control characters are not taken."""
    return given if given and _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()  # 32 hex digits, as uuid4().hex, at a fifth of its cost


class CallFailed(Exception):
    """A call that ended with a status other than OK (already logged and counted)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, retry_after: float | None, request_id: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason  # RagserveError.reason, or "internal"
        self.retry_after = retry_after  # seconds, on every RESOURCE_EXHAUSTED
        self.request_id = request_id


class CallGuard:
    def __init__(
        self,
        admission: Admission,
        on_finish: Callable[[RequestRecord, str], None] | None = None,
        on_start: Callable[[RequestRecord], None] | None = None,
        *,
        auth: Authenticator | None = None,
        quotas: KeyQuotas | None = None,
    ) -> None:
        self.admission = admission
        self.auth = auth  # None: no keys (every call open)
        self.quotas = quotas or KeyQuotas()
        self.on_finish = on_finish or (lambda record, code: None)
        self.on_start = on_start or (lambda record: None)  # in-flight gauges need the start too

    def scope(
        self,
        service: str,
        method: str,
        request_id: str,
        *,
        lane: str = INTERACTIVE,
        admit: bool = True,
        headers: Mapping[str, str] | None = None,
        identity: Identity | RagserveError | None = None,
        deadline_passed: Callable[[], bool] | None = None,
        carrier: Mapping[str, str] | None = None,
        span_name: str | None = None,
        log_fields: Mapping[str, object] | None = None,
        enter=None,
    ) -> "CallScope":
        """`headers`: the caller's headers / metadata (its key); `identity`: the outcome of
        `authenticate` when the front ran it already; `deadline_passed()` tells a spent
        deadline from a caller's cancel; `carrier`: incoming headers / metadata holding a
        caller's `traceparent`; `enter`: an awaitable factory run first inside the scope
        (gRPC sends the request id there)."""
        if identity is None:
            identity = self.authenticate(service, headers)
        return CallScope(self, service, method, request_id, lane, admit, identity, deadline_passed, carrier, span_name, log_fields, enter)

    def authenticate(self, service: str, headers) -> Identity | RagserveError:
        """The key check alone (no state, no logging): an Identity or the refusal to raise."""
        return ANONYMOUS if self.auth is None else self.auth.check(service, headers or {})


class CallScope:
    """One call's scope: `async with` it (see the module docstring)."""

    def __init__(self, guard, service, method, request_id, lane, admit, identity, deadline_passed, carrier, span_name, log_fields, enter) -> None:
        self.guard = guard
        self.record = RequestRecord(service, method, request_id)
        self.lane = guard.admission.lane_for(lane)
        self.admit = admit
        self.identity = identity
        self._release_quota = None
        self.deadline_passed = deadline_passed
        self.carrier = carrier
        self.span_name = span_name
        self.log_fields = log_fields
        self.enter = enter
        self.code, self.message = grpc.StatusCode.OK, ""
        self.retry_after: float | None = None
        self._admitted: float | None = None  # the permit's start time once taken
        self._tokens = None
        self._span = None

    @property
    def request_id(self) -> str:
        return self.record.request_id

    async def __aenter__(self) -> "CallScope":
        record = self.record
        structlog.contextvars.bind_contextvars(request_id=record.request_id, service=record.service, method=record.method)
        if self.log_fields:
            structlog.contextvars.bind_contextvars(**self.log_fields)
        self._tokens = (request_record.start(record), CURRENT_LANE.set(self.lane))
        self.guard.on_start(record)
        try:
            if self.enter is not None:
                await self.enter()
            identity = self.identity
            if isinstance(identity, RagserveError):
                if (name := getattr(identity, "key_name", None)) is not None:
                    structlog.contextvars.bind_contextvars(api_key_name=name)
                    record.key_name = name
                raise identity  # a caller without a valid key never takes or waits for a permit
            if identity.key is not None:
                structlog.contextvars.bind_contextvars(api_key_name=identity.key.name)
                record.key_name = identity.key.name
                self._release_quota = self.guard.quotas.take(identity.key)
            if tracing.enabled():  # after the key check: a refused caller makes no span
                carrier = {k: v for k in _TRACE_HEADERS if (v := (self.carrier or {}).get(k)) is not None}
                self._span = tracing.start_call(self.span_name or f"ragserve.v1.{record.service}/{record.method}", record, carrier)
            if self.admit:
                with request_record.stage("admission"):
                    self._admitted = self.guard.admission.acquire(self.lane)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise  # __aexit__ raised CallFailed for a mapped error; anything else goes on as is
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        record = self.record
        try:
            if exc is None:
                pass
            elif isinstance(exc, RagserveError):
                self.code, self.message = status_of(exc)
                record.error_reason = exc.reason
                if isinstance(exc, Overloaded):
                    # Every RESOURCE_EXHAUSTED carries a retry hint computed from the load.
                    self.retry_after = exc.retry_after if exc.retry_after is not None else self.guard.admission.hint(self.lane)
                    log.info("rpc_rejected", code=self.code.name, error=self.message, retry_after_ms=round(self.retry_after * 1000))
                else:
                    log.info("rpc_rejected", code=self.code.name, error=self.message)
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                # The caller went away, or its deadline passed (gRPC cancels the handler then too).
                if self.deadline_passed is not None and self.deadline_passed():
                    self.code, record.error_reason = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"
                else:
                    self.code = grpc.StatusCode.CANCELLED  # the caller's choice: not a rejection
            elif isinstance(exc, Exception):  # a bug: logged once with its cause, answered INTERNAL
                self.code, self.message = status_of(exc)
                record.error_reason = "internal"
                log.error("rpc_failed", code=self.code.name, exc_info=exc)
            else:
                self.code = grpc.StatusCode.CANCELLED  # KeyboardInterrupt / SystemExit: not ours to map
        finally:
            request_token, lane_token = self._tokens
            CURRENT_LANE.reset(lane_token)
            if self._admitted is not None:
                self.guard.admission.release(self.lane, self._admitted)
                self._admitted = None
            if self._release_quota is not None:
                self._release_quota()
            duration = record.duration = time.perf_counter() - record.started
            log.info(
                "rpc",
                status=self.code.name,
                duration_ms=round(duration * 1000, 3),
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )
            self.guard.on_finish(record, self.code.name)
            if self._span is not None:
                tracing.end_call(self._span, self.code.name, self.message)
            request_record.finish(request_token)
            structlog.contextvars.unbind_contextvars("request_id", "service", "method", "api_key_name", *(self.log_fields or ()))
        if exc is None or isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or not isinstance(exc, Exception):
            return False  # re-raised as is
        raise CallFailed(self.code, self.message, record.error_reason or "internal", self.retry_after, record.request_id) from exc
