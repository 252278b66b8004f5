"""The gateway's own floor for bench/latency_ladder.py: ragserve's gateway, as deployed, in front
of the tests' fake backend (tests/fakes.py: answers at once, no Triton, no model).

Its latency at concurrency 1 is what the gateway itself (interceptor, admission, tokenizing,
request and response building, logging and metrics) adds to loopback gRPC; set beside
bench/echo_server.py (a grpc.aio server that does nothing), the difference is ragserve's part.

    .venv/bin/python bench/gateway_floor_server.py --port 50123 [--undo metrics] [--event-loop asyncio]

`--undo NAME` puts back what a kept change of issue 23 replaced, so that bench/profile_embed.py
can show each change's gain in the same run (UNDO lists them).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fakes import FakeBackend  # noqa: E402
from ragserve_server.app import create_gateway  # noqa: E402
from ragserve_server.main import EVENT_LOOPS, event_loop_factory  # noqa: E402
from ragserve_server.models.catalog import build_catalog  # noqa: E402
from ragserve_server.observability.logging_setup import configure_logging  # noqa: E402
from ragserve_server.models.builtin import minilm_spec  # noqa: E402
from ragserve_server.settings import Settings  # noqa: E402


class _Discard(list):
    """The fake's request log, kept empty: a long run would otherwise hold every input."""

    def append(self, item) -> None:
        pass


def _prometheus_metrics() -> None:
    """Before loop_metrics.py: prometheus_client's own (locking) Counter, Gauge, Histogram."""
    import prometheus_client

    from ragserve_server.observability import metrics

    metrics.Counter, metrics.Gauge, metrics.Histogram = prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram


def _structlog_chain() -> None:
    """Before: structlog's TimeStamper (a datetime per line) and PrintLogger (print())."""
    import structlog

    from ragserve_server.observability import logging_setup

    logging_setup._UtcTimestamp = lambda: structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.WriteLoggerFactory = structlog.PrintLoggerFactory  # this process only


def _uuid_request_ids() -> None:
    """Before: a new request id from uuid4().hex."""
    import uuid

    import undone_interceptor
    from ragserve_server.calls import call_scope
    from ragserve_server.transport import grpc_methods

    def request_id_or_new(given):
        return given if given and call_scope._REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    grpc_methods.request_id_or_new = undone_interceptor.request_id_or_new = request_id_or_new


def _contextlib_stages() -> None:
    """Before: request_record.stage() as a contextlib generator."""
    import time
    from contextlib import contextmanager

    from ragserve_server.observability import request_record

    @contextmanager
    def stage(name: str):
        record = request_record.current()
        begin = time.perf_counter()
        try:
            yield
        finally:
            if record is not None:
                record.add_stage(name, time.perf_counter() - begin)

    request_record.stage = stage


def _interceptor() -> None:
    """Before: the generic grpc.aio ServerInterceptor (bench/undone_interceptor.py), a new
    handler per call, in front of the servicers' own handlers (gRPC parses the request)."""
    import grpc

    from ragserve_server import app
    from undone_interceptor import GatewayInterceptor

    made: dict = {}

    class Unwrapped(app.GatewayMethods):
        def __init__(self, guard, **kwargs) -> None:
            super().__init__(guard, **kwargs)
            made["interceptor"] = GatewayInterceptor(guard, max_open_streams=kwargs.get("max_open_streams", 0))

        def wrap(self, service, method, handler):
            return handler

    server = grpc.aio.server
    app.GatewayMethods = Unwrapped
    app.grpc.aio.server = lambda **kwargs: server(interceptors=[made["interceptor"]], **kwargs)


UNDO = {
    "metrics": _prometheus_metrics, "access-log": _structlog_chain, "request-id": _uuid_request_ids,
    "stages": _contextlib_stages, "interceptor": _interceptor,
}


async def serve(port: int) -> None:
    settings = Settings(port=port, http_port=0)
    # As main.py does: JSON lines (structlog's default console renderer costs several times more).
    configure_logging(settings.log_format, settings.log_level)
    backend = FakeBackend()
    backend.requests = backend.timeouts = backend.lanes = _Discard()
    gateway = await create_gateway(settings, backend, build_catalog([minilm_spec()]))
    for name in CANDIDATES:
        CANDIDATES[name]()
    await gateway.server.wait_for_termination()


def _gc_freeze() -> None:
    """Tried: what start-up made moved out of the collector's generations (gc.freeze)."""
    import gc

    gc.collect()
    gc.freeze()


TRIED = {"gc-freeze": _gc_freeze}
CANDIDATES: dict = {}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--undo", action="append", default=[], choices=sorted(UNDO), help="put back what a kept change replaced")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=Settings.event_loop, help="the gateway's default unless given")
    parser.add_argument("--try", dest="tried", action="append", default=[], choices=sorted(TRIED), help="a candidate not kept (yet)")
    args = parser.parse_args()
    for name in args.undo:
        UNDO[name]()
    CANDIDATES.update({name: TRIED[name] for name in args.tried})
    with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
        runner.run(serve(args.port))
