"""Load-shedding promises against real processes (issue 25): `--lanes one` shares one budget
between bulk and interactive work, and a full Triton queue (the model's queue policy) is
answered RESOURCE_EXHAUSTED with a retry hint, not only a full lane.

One Triton per module serves a copy of minilm whose queue policy holds a single request, so
its queue fills with a handful of calls."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from support import MODEL_REPOSITORY, GatewayProcess, metric_value, start_triton

pytestmark = pytest.mark.integration

LONG = "a long passage about retrieval augmented generation and vector search " * 20  # ~250 tokens
HEAVY = 64  # long passages per call: one Triton request of seconds of compute


@pytest.fixture(scope="module")
def small_queue_triton(tmp_path_factory):
    """A Triton whose minilm (two instances) queues at most one request."""
    repository = tmp_path_factory.mktemp("small_queue_repository")
    for entry in MODEL_REPOSITORY.iterdir():
        if entry.is_dir() and entry.name != "minilm":
            (repository / entry.name).symlink_to(entry, target_is_directory=True)
    minilm = repository / "minilm"
    minilm.mkdir()
    (minilm / "1").symlink_to(MODEL_REPOSITORY / "minilm" / "1", target_is_directory=True)
    config = (MODEL_REPOSITORY / "minilm" / "config.pbtxt").read_text()
    config, replaced = re.subn(r"max_queue_size: \d+", "max_queue_size: 1", config)
    assert replaced == 1, "minilm's config has no max_queue_size to shrink"
    (minilm / "config.pbtxt").write_text(config)
    server = start_triton(tmp_path_factory.mktemp("small_queue_triton"), ["minilm"], repository)
    yield server
    server.stop()


def pushback(exc: grpc.aio.AioRpcError) -> str | None:
    return {key: value for key, value in exc.trailing_metadata() or ()}.get("grpc-retry-pushback-ms")


def heavy(i: int) -> embed_pb2.EmbedRequest:
    return embed_pb2.EmbedRequest(inputs=[f"{i} {LONG}"] * HEAVY, truncate=common_pb2.TRUNCATE_END)


async def test_lanes_one_makes_stream_messages_take_the_interactive_budget(small_queue_triton, tmp_path):
    """`--lanes one`: EmbedStream messages (bulk) and unary calls share one budget. With one
    permit, a unary call made while a stream message is being computed is refused at once with
    a retry hint; under `--lanes two` (the default) the stream would have its own bulk permit
    and a lone unary call always goes through."""
    gateway = GatewayProcess(
        small_queue_triton.grpc_url, small_queue_triton.models, tmp_path / "gateway.log",
        "--lanes", "one", "--max-concurrent-requests", "1",
    ).wait_serving()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = embed_pb2_grpc.EmbedStub(channel)
            await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm"]), timeout=60)

            async def messages():
                for i in range(2):
                    yield embed_pb2.EmbedStreamRequest(id=str(i), request=heavy(i))

            stream = asyncio.ensure_future(_collect(stub.EmbedStream(messages(), timeout=240)))
            refused: list[grpc.aio.AioRpcError] = []

            # One unary call at a time (never two competing with each other), until one is
            # refused or the stream ends (bounded by the stream's deadline).
            while not refused and not stream.done():
                try:
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=["an interactive query"]), timeout=60)
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc)
                await asyncio.sleep(0.02)
            answers = await stream
        assert refused, "the stream ended before any unary call was refused: the lanes are not shared"
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused[0]
        assert "interactive" in refused[0].details(), refused[0].details()
        assert pushback(refused[0]) is not None and int(pushback(refused[0])) > 0
        # The stream itself waits for the shared permit instead of failing: every message answered.
        assert sorted(a.id for a in answers) == ["0", "1"]
        assert all(a.HasField("response") for a in answers)
    finally:
        gateway.stop()


async def _collect(call):
    return [answer async for answer in call]


async def test_a_full_triton_queue_is_answered_resource_exhausted_with_a_retry_hint(small_queue_triton, tmp_path):
    """Triton's queue policy (max_queue_size 1) rejects what does not fit; the gateway answers
    RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`, not UNAVAILABLE or INTERNAL. The lanes are
    wide, so every refusal comes from Triton's queue."""
    gateway = GatewayProcess(
        small_queue_triton.grpc_url, small_queue_triton.models, tmp_path / "gateway.log",
        "--max-concurrent-requests", "64",
    ).wait_serving()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = embed_pb2_grpc.EmbedStub(channel)
            await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm"]), timeout=60)

            async def call(i: int):
                try:
                    await stub.Embed(heavy(i), timeout=240)
                    return "OK", None, ""
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, pushback(exc), exc.details() or ""

            # Two execute (two instances), one queues, the rest find the queue full. The
            # coalescer lets two requests of one shape reach Triton: vary the lengths.
            calls = [call(i) if i % 2 else _shape(stub, i) for i in range(8)]
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=280)
        codes = {code for code, _, _ in results}
        assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, results
        rejected = [(hint, details) for code, hint, details in results if code == "RESOURCE_EXHAUSTED"]
        assert rejected, f"8 heavy calls on 2 instances and a queue of 1 must find the queue full: {results}"
        # Triton's own words for its queue policy's rejection, passed through by the gateway.
        assert all("Exceeds maximum queue size" in details for _, details in rejected), rejected
        assert all(hint is not None and int(hint) > 0 for hint, _ in rejected), rejected
        print(f"[triton queue full] {len(rejected)} of {len(results)} refused, hints {[h for h, _ in rejected]} ms")
    finally:
        gateway.stop()


async def _shape(stub, i: int):
    """A heavy call of another length bucket than `heavy` (half the passage)."""
    half = LONG[: len(LONG) // 2]
    try:
        await stub.Embed(embed_pb2.EmbedRequest(inputs=[f"{i} {half}"] * HEAVY, truncate=common_pb2.TRUNCATE_END), timeout=240)
        return "OK", None, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, pushback(exc), exc.details() or ""


def small_engine_repository(root):
    """A model repository whose smollm2 runs one sequence at a time and queues one more."""
    repository = root / "small_engine_repository"
    model = repository / "smollm2"
    model.mkdir(parents=True)
    (model / "1").symlink_to(MODEL_REPOSITORY / "smollm2" / "1", target_is_directory=True)
    config = (MODEL_REPOSITORY / "smollm2" / "config.pbtxt").read_text()
    for key in ("max_running_sequences", "max_waiting"):
        config, replaced = re.subn(rf'(key: "{key}"\s*value \{{\s*string_value: )"\d+"', r'\1"1"', config)
        assert replaced == 1, f"smollm2's config has no {key} parameter"
    (model / "config.pbtxt").write_text(config)
    return repository


def test_a_full_generation_queue_pushes_back_and_a_stream_that_then_fails_ends_with_an_error_event(tmp_path):
    """Two promises on one SmolLM2 Triton (its start is the expensive part), in order:
    1. the engine's queue (max_waiting 1, one sequence running) full: a chat completion is
       answered 429 with the gateway's hint (`retry-after-ms`), reason `overload`;
    2. docs/http_and_tracing.md: "A stream that fails after it started ends with an
       `{"error": ...}` event, then `data: [DONE]`": Triton is killed while a chat completion
       streams; the stream's 200 is already sent, so the failure arrives as an event."""
    import json
    import threading

    import httpx

    from ragserve_server.models.builtin import smollm2_spec
    from support import free_port, unavailable, wait_until

    if smollm2_spec(MODEL_REPOSITORY).missing_artifacts(MODEL_REPOSITORY):
        unavailable("SmolLM2 is not built: `make models`")
    triton = start_triton(tmp_path / "triton", ["smollm2"], small_engine_repository(tmp_path))
    http_port = free_port()
    base_url = f"http://127.0.0.1:{http_port}"
    gateway = GatewayProcess(triton.grpc_url, ["smollm2"], tmp_path / "gateway.log", "--http-port", str(http_port))
    engine = lambda name: metric_value(triton.metrics_url, name)  # noqa: E731
    waiting_call = None
    try:
        gateway.wait_serving(timeout=120)
        chat = lambda content, **extra: {  # noqa: E731
            "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra
        }
        events: list[str] = []
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=chat("Count from one to one thousand.", max_tokens=1000, stream=True), timeout=120) as response:
            assert response.status_code == 200
            lines = (line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))
            events.append(next(lines))  # the stream has started
            wait_until(lambda: engine("ragserve_engine_running_sequences") == 1, 60, "the sequence running")
            # 1. A second call waits in the engine's queue (its one place); a third finds it full.
            waiting_call = threading.Thread(
                target=lambda: httpx.post(base_url + "/v1/chat/completions", json=chat("Hi", max_tokens=2), timeout=120)
            )
            waiting_call.start()
            wait_until(lambda: engine("ragserve_engine_waiting_sequences") == 1, 60, "the second call waiting in the engine")
            full = httpx.post(base_url + "/v1/chat/completions", json=chat("Hello", max_tokens=2), timeout=120)
            assert full.status_code == 429, full.text
            assert "generation queue is full" in full.json()["error"]["message"], full.text
            assert full.json()["error"]["code"] == "overload", full.text
            assert int(full.headers["retry-after-ms"]) > 0 and "retry-after" in full.headers, full.headers
            # 2. The model server dies mid-stream.
            triton.process.kill()
            events.extend(lines)
        assert events[-1] == "[DONE]", events[-3:]
        payloads = [json.loads(event) for event in events[:-1]]
        assert all("error" not in p for p in payloads[:-1]), payloads
        error = payloads[-1].get("error")
        assert error is not None, f"the last event before [DONE] is not an error: {payloads[-1]}"
        assert error["message"] and error["type"] and error["code"], error
        assert any(p.get("choices") for p in payloads[:-1]), "no text streamed before the failure"
        print(f"[generation queue full] {full.status_code} {full.json()['error']['message']!r} retry-after-ms={full.headers['retry-after-ms']}")
        print(f"[stream error event] {len(payloads) - 1} chunks, then {error}")
    finally:
        gateway.stop()
        triton.stop()  # ends the orphaned python-backend stubs too
        if waiting_call is not None:
            waiting_call.join(120)


async def test_tracing_on_configured_only_by_otel_variables_exports_over_otlp(small_queue_triton, tmp_path, monkeypatch):
    """`--tracing on` with nothing but the standard OTEL_* variables: the gateway's spans reach
    an OTLP/gRPC receiver started here, under the service name and in the caller's trace."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ragserve-otel-env-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    gateway = GatewayProcess(small_queue_triton.grpc_url, small_queue_triton.models, tmp_path / "gateway.log", "--tracing", "on")
    try:
        gateway.wait_serving()
        trace_id = "5b8efff798038103d269b633813fc60c"
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            await embed_pb2_grpc.EmbedStub(channel).Embed(
                embed_pb2.EmbedRequest(inputs=["traced"]), timeout=60,
                metadata=(("traceparent", f"00-{trace_id}-eee19b7ec3c1b174-01"),),
            )

        def spans_of_the_call():
            found = []
            for request in list(received):
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
                    for scope in resource.scope_spans:
                        found += [(service, span) for span in scope.spans if span.trace_id.hex() == trace_id]
            return found

        spans = await asyncio.to_thread(lambda: _wait(spans_of_the_call, "the call's spans at the OTLP receiver"))
        assert {service for service, _ in spans} == {"ragserve-otel-env-test"}, spans
        assert any(span.parent_span_id.hex() == "eee19b7ec3c1b174" for _, span in spans), [s.name for _, s in spans]
        print(f"[otlp] {len(spans)} spans of the call received: {sorted(s.name for _, s in spans)}")
    finally:
        gateway.stop()
        server.stop(0)


def _wait(predicate, what: str):
    from support import wait_until

    return wait_until(predicate, 60, what)
