"""One trace from the caller through the gateway into Triton (OpenTelemetry).

The gateway runs in-process with the SDK's in-memory exporter; the real bundled Triton runs
with `--trace-config mode=opentelemetry` (the launcher's trace flags) and exports its spans
over OTLP/HTTP (JSON) to a receiver on loopback. The caller's span, the gateway's call and
stage spans and Triton's spans must form one trace, parented and ordered.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import warnings

import httpx
import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ragserve
from ragserve_server.observability import request_record, tracing
from ragserve_server.app import create_gateway
from ragserve_server.models.catalog import build_catalog
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.settings import Settings
from ragserve_server.backend.triton import TritonBackend
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer
from support import MODEL_REPOSITORY, free_port

STAGES = ["admission", "tokenize", "triton", "respond"]
SLACK_NS = 2_000_000  # Triton and Python read the same clock; rounding and export jitter only


class OtlpJsonReceiver:
    """A minimal OTLP/HTTP trace receiver (Triton's exporter posts JSON to /v1/traces)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                for resource in json.loads(body).get("resourceSpans", []):
                    for scope in resource.get("scopeSpans", []):
                        receiver.spans.extend(scope.get("spans", []))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def unparented_requests(self, since: int) -> list[dict]:
        """Triton request spans received after the first `since` spans that continue no
        caller's trace (what Triton exports for a request that came without a traceparent)."""
        return [s for s in self.spans[since:] if s["name"] == "InferRequest" and not s.get("parentSpanId")]

    def trace(self, trace_id: str, count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in self.spans if s["traceId"] == trace_id]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return [s for s in self.spans if s["traceId"] == trace_id]


def warm_up_trace_export(server: TritonServer, receiver: "OtlpJsonReceiver", timeout: float = 60.0) -> None:
    """One request straight to Triton, until its spans reach the receiver: Triton's exporter
    then runs (on a loaded machine the first export can come late), so the tests wait only
    for their own spans."""
    import numpy as np
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(server.grpc_url)
    inputs = [triton_grpc.InferInput(name, [1, 4], "INT64") for name in ("input_ids", "attention_mask")]
    inputs[0].set_data_from_numpy(np.array([[101, 7592, 2088, 102]], dtype=np.int64))
    inputs[1].set_data_from_numpy(np.ones((1, 4), dtype=np.int64))
    # Under a trace of their own: the tests count Triton's root request spans.
    warm_up = {"traceparent": "00-" + "5" * 32 + "-" + "5" * 16 + "-01"}
    deadline = time.monotonic() + timeout
    while not receiver.spans:
        assert time.monotonic() < deadline, "the traced Triton exported no span"
        client.infer("minilm", inputs, headers=warm_up)
        time.sleep(1.0)


@pytest.fixture(scope="module")
def traced_triton(tmp_path_factory):
    receiver = OtlpJsonReceiver()
    server = TritonServer(
        MODEL_REPOSITORY, ["minilm"], TritonPorts(free_port(), free_port(), free_port()), tmp_path_factory.mktemp("traced_triton"),
        trace_url=f"127.0.0.1:{receiver.port}/v1/traces", trace_rate=1,
    )
    server.start()
    try:
        server.wait_ready(180)
        warm_up_trace_export(server, receiver)
        yield server, receiver
    finally:
        server.stop()
        receiver.server.shutdown()


@pytest.fixture
async def traced_gateway(traced_triton):
    triton, receiver = traced_triton
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    settings = Settings(port=0, http_port=free_port(), health_poll_interval=0.2)
    gateway = await create_gateway(settings, TritonBackend(triton.grpc_url), build_catalog([minilm_spec()]))
    try:
        yield gateway, provider.get_tracer("caller"), exporter, receiver
    finally:
        await gateway.stop(1)
        tracing.install(None)


def _hex(span_id: int) -> str:
    return format(span_id, "016x")


def check_gateway_spans(caller, exporter: InMemorySpanExporter, call_name: str):
    """The gateway's call span continues the caller's trace, its stage spans are its children
    in order; returns the `triton` stage span."""
    trace_id = caller.context.trace_id
    ours = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in ours}
    call = by_name[call_name]
    assert call.parent.span_id == caller.context.span_id  # the gateway continued the caller's trace
    stages = sorted((s for s in ours if s.parent is not None and s.parent.span_id == call.context.span_id), key=lambda s: s.start_time)
    assert [s.name for s in stages] == STAGES  # in order, each a child of the call
    for before, after in zip(stages, stages[1:]):
        assert before.end_time <= after.start_time
    assert caller.start_time <= call.start_time <= stages[0].start_time and stages[-1].end_time <= call.end_time <= caller.end_time
    return by_name["triton"]


def check_triton_spans(theirs: dict[str, dict], triton_stage) -> None:
    """Triton's spans: the request under the gateway's `triton` stage, the model, its compute."""
    assert theirs["InferRequest"]["parentSpanId"] == _hex(triton_stage.context.span_id)
    assert theirs["minilm"]["parentSpanId"] == theirs["InferRequest"]["spanId"]
    assert theirs["compute"]["parentSpanId"] == theirs["minilm"]["spanId"]
    events = [e["name"] for e in theirs["minilm"].get("events", [])]
    assert "QUEUE_START" in events, events
    # In causal order: the stage opens, Triton receives the request, queues it, computes, and
    # the gateway has the answer. (Triton closes its spans after sending the response, so their
    # ends may trail the stage's end by a little on a busy machine: not checked.)
    start = int(theirs["InferRequest"]["startTimeUnixNano"])
    model_start, compute_start = int(theirs["minilm"]["startTimeUnixNano"]), int(theirs["compute"]["startTimeUnixNano"])
    assert triton_stage.start_time - SLACK_NS <= start <= model_start <= compute_start <= triton_stage.end_time


# Triton 2.51 does not join every traced call, for two reasons outside the gateway, so a
# call whose Triton spans are missing or unparented is repeated, up to TRACED_ATTEMPTS calls
# (every call's gateway spans are checked; a gateway that sent no traceparent fails them all):
# - Its gRPC frontend reads the `traceparent` metadata as a C string (GrpcServerCarrier::Get
#   returns grpc::string_ref::data(), which is not NUL-terminated), so now and then the value
#   runs on into the bytes after it, fails the 55-character check and Triton starts a root
#   trace: here 1 of 16 Triton requests in four 48-call bursts (Triton main reads it so too).
# - Now and then the spans of a call never arrive (5 min waited, Triton logs nothing) while
#   those of the calls before and after arrive within a second: a few traced calls in a
#   hundred with the machine loaded (CI, or 4 busy CPU loops beside the test).
TRACED_ATTEMPTS = 3
TRITON_EXPORT_WAIT_S = 30.0


async def check_trace_down_to_triton(make_call, exporter: InMemorySpanExporter, receiver: OtlpJsonReceiver, call_name: str) -> None:
    """`make_call`: runs one call inside a caller span and returns that span."""
    for attempt in range(1, TRACED_ATTEMPTS + 1):
        seen = len(receiver.spans)
        caller = await make_call()
        triton_stage = check_gateway_spans(caller, exporter, call_name)
        theirs = {s["name"]: s for s in receiver.trace(format(caller.context.trace_id, "032x"), 3, timeout=TRITON_EXPORT_WAIT_S)}
        if {"InferRequest", "minilm", "compute"} <= set(theirs):
            check_triton_spans(theirs, triton_stage)
            return
        roots = len(receiver.unparented_requests(seen))
        warnings.warn(f"call {attempt}: Triton exported {sorted(theirs)} of its spans and {roots} root request spans; calling again")
    pytest.fail(f"Triton exported the spans of none of {TRACED_ATTEMPTS} traced calls")


@pytest.mark.integration  # a real Triton, traced
async def test_grpc_call_joins_the_callers_trace_down_to_triton(traced_gateway):
    gateway, tracer, exporter, receiver = traced_gateway

    async def make_call():
        async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0) as client:
            with tracer.start_as_current_span("caller") as caller:  # the SDK sends its traceparent
                await client.embed(["the trace goes into Triton"], timeout=30)
        return caller

    await check_trace_down_to_triton(make_call, exporter, receiver, "ragserve.v1.Embed/Embed")


@pytest.mark.integration  # a real Triton, traced
async def test_http_call_joins_the_callers_trace_down_to_triton(traced_gateway):
    gateway, tracer, exporter, receiver = traced_gateway

    async def make_call():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30) as client:
            with tracer.start_as_current_span("caller") as caller:
                headers: dict[str, str] = {}
                propagate.inject(headers)
                assert "traceparent" in headers
                response = await client.post("/v1/embeddings", json={"input": "the trace goes into Triton"}, headers=headers)
        assert response.status_code == 200, response.text
        return caller

    await check_trace_down_to_triton(make_call, exporter, receiver, "POST /v1/embeddings")


@pytest.mark.integration  # a real Triton, traced
async def test_a_joined_request_links_its_callers_and_triton_is_under_it(traced_gateway):
    gateway, tracer, exporter, receiver = traced_gateway

    async def traced_call(client, index: int) -> int:
        with tracer.start_as_current_span(f"caller {index}") as caller:
            await client.embed([f"joined call number {index}"], timeout=60)
        return caller.context.trace_id

    for attempt in range(1, TRACED_ATTEMPTS + 1):
        exporter.clear()
        seen = len(receiver.spans)
        async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0) as client:
            callers = set(await asyncio.gather(*(traced_call(client, i) for i in range(48))))
        joined = [s for s in exporter.get_finished_spans() if s.name == "ragserve.coalesced_request"]
        assert joined, "48 concurrent calls: the coalescer joined none"
        stages = {
            (s.context.trace_id, s.context.span_id): s for s in exporter.get_finished_spans() if s.name == "triton" and s.context.trace_id in callers
        }
        for span in joined:
            assert span.parent is None and span.context.trace_id not in callers  # its own trace
            assert span.attributes["ragserve.joined_calls"] == len(span.links) >= 1
            for link in span.links:  # each link is a caller's `triton` stage, which waited for it
                stage = stages[(link.context.trace_id, link.context.span_id)]
                assert stage.start_time <= span.start_time and span.end_time <= stage.end_time
        # Triton's request span of the joined request is a child of its span.
        widest = max(joined, key=lambda s: len(s.links))
        theirs = {s["name"]: s for s in receiver.trace(format(widest.context.trace_id, "032x"), 3, timeout=TRITON_EXPORT_WAIT_S)}
        if "InferRequest" in theirs:
            assert theirs["InferRequest"]["parentSpanId"] == _hex(widest.context.span_id), theirs
            return
        roots = len(receiver.unparented_requests(seen))
        warnings.warn(f"round {attempt}: Triton exported no request span of the joined request and {roots} root request spans; again")
    pytest.fail(f"Triton exported the request span of none of {TRACED_ATTEMPTS} joined requests")


@pytest.mark.integration  # a real Triton, traced
async def test_a_failed_call_is_an_error_span(traced_gateway):
    gateway, tracer, exporter, receiver = traced_gateway
    async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0) as client:
        with tracer.start_as_current_span("caller") as caller:
            with pytest.raises(ragserve.InvalidArgumentError):
                await client.embed([""], timeout=30)
    call = next(s for s in exporter.get_finished_spans() if s.name == "ragserve.v1.Embed/Embed" and s.context.trace_id == caller.context.trace_id)
    assert call.status.status_code.name == "ERROR" and call.attributes["rpc.grpc.status_code_name"] == "INVALID_ARGUMENT"


def test_tracing_off_costs_nothing_and_sends_nothing():
    tracing.install(None)
    assert not tracing.enabled()
    assert request_record.stage_span is None  # stages are timed, no span is made
    assert tracing.outgoing_metadata() is None  # Triton calls carry no extra metadata
    assert not tracing.configure("on", env={"OTEL_SDK_DISABLED": "true"})  # the standard switch wins
    assert not tracing.enabled()
    with pytest.raises(ValueError):
        tracing.configure("sometimes", env={})
