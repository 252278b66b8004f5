"""Per-request record of what a call did: stage timings and token counts.

Services note stages with `stage("tokenize")` and tokens with `add_tokens(...)`; the
interceptor opens a record per call and hands it to the metrics module when the call ends,
so handlers never touch Prometheus.

Generation contract (read by metrics.GatewayMetrics): times are `time.perf_counter()`
values, the clock of `started`. A service that generates calls `token_emitted(n)` when n
tokens arrive from the engine (or fills the fields itself): `first_token_at` is when the
first token arrived (time to first token = first_token_at - started) and `token_times` has
one entry per generated token, the first one included (inter-token latency = the
differences of consecutive entries; tokens that arrive together share a time).
`completion_tokens` counts them for usage via `add_tokens(completion=...)`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from collections.abc import Iterator


@dataclass
class RequestRecord:
    service: str
    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    prompt_tokens: int = 0
    completion_tokens: int = 0
    padded_tokens: int = 0  # tokens sent to Triton including bucket padding
    real_tokens: int = 0  # of which real tokens
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    duration: float = 0.0  # whole call, set by the interceptor when it ends
    error_reason: str | None = None  # RagserveError.reason (or "internal") of a failed call
    key_name: str | None = None  # the caller's API key's name (keys on), for per-key metrics

    def add_stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


_current: ContextVar[RequestRecord | None] = ContextVar("ragserve_request_record", default=None)
# A context manager factory opening a trace span per stage, set by tracing.install while
# tracing is on; None (the default) costs nothing.
stage_span = None


def current() -> RequestRecord | None:
    return _current.get()


def start(record: RequestRecord):
    return _current.set(record)


def finish(token) -> None:
    _current.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    record = _current.get()
    begin = time.perf_counter()
    try:
        if stage_span is None or record is None:
            yield
        else:
            with stage_span(name):
                yield
    finally:
        if record is not None:
            record.add_stage(name, time.perf_counter() - begin)


def add_tokens(*, prompt: int = 0, completion: int = 0) -> None:
    record = _current.get()
    if record is not None:
        record.prompt_tokens += prompt
        record.completion_tokens += completion


def add_padding(*, real: int, padded: int) -> None:
    record = _current.get()
    if record is not None:
        record.real_tokens += real
        record.padded_tokens += padded


def token_emitted(count: int = 1) -> None:
    """Notes `count` generated tokens arriving now (see the generation contract above)."""
    record = _current.get()
    if record is not None and count > 0:
        now = time.perf_counter()
        if record.first_token_at is None:
            record.first_token_at = now
        record.token_times.extend([now] * count)
