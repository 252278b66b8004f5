"""Metrics and access logs, in-process on a fake backend: what each call writes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

import ragserve
from ragserve.v1 import embed_pb2, embed_pb2_grpc
from ragserve_server.app import create_gateway
from ragserve_server.models.catalog import build_catalog
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.observability.metrics import GatewayMetrics, TritonBatchCollector
from ragserve_server.observability.request_record import RequestRecord
from ragserve_server.settings import Settings
from fakes import FakeBackend
from support import eventually


@pytest.fixture
async def stack():
    backend = FakeBackend()
    settings = Settings(port=0, max_concurrent_requests=2, health_poll_interval=0.05, triton_stats_interval=0.05)
    gateway = await create_gateway(settings, backend, build_catalog([minilm_spec()]))
    client = ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0)  # rejections are counted exactly
    yield backend, client, gateway
    await client.close()
    await gateway.stop(0)


def samples(registry) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a registry's exposition."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape, name, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_calls_write_counters_stages_tokens_and_padding(stack):
    _, client, gateway = stack
    texts = ["short", "a somewhat longer sentence about retrieval augmented generation"]
    usage = 0
    for _ in range(3):
        usage += (await client.embed(texts)).usage.prompt_tokens
    scrape = samples(gateway.metrics.registry)
    embed = {"service": "Embed", "method": "Embed"}
    assert value(scrape, "ragserve_requests_total", code="OK", **embed) == 3
    assert value(scrape, "ragserve_request_duration_seconds_count", **embed) == 3
    for stage in ("admission", "tokenize", "triton", "respond"):
        assert value(scrape, "ragserve_stage_duration_seconds_count", stage=stage, **embed) == 3, stage
    stage_sum = sum(
        value(scrape, "ragserve_stage_duration_seconds_sum", stage=s, **embed) for s in ("admission", "tokenize", "triton", "respond")
    )
    assert 0 < stage_sum <= value(scrape, "ragserve_request_duration_seconds_sum", **embed)
    assert value(scrape, "ragserve_tokens_total", service="Embed", kind="prompt") == usage
    real = value(scrape, "ragserve_triton_input_tokens_total", service="Embed", kind="real")
    padding = value(scrape, "ragserve_triton_input_tokens_total", service="Embed", kind="padding")
    assert real == usage and padding > 0  # "short" is padded up to its length bucket
    assert value(scrape, "ragserve_padding_efficiency_ratio_count", service="Embed") == 3
    assert value(scrape, "ragserve_requests_in_flight", service="Embed") == 0


async def test_in_flight_gauge_counts_running_calls(stack):
    backend, client, gateway = stack
    backend.delay = 2.0
    call = asyncio.create_task(client.embed(["slow"]))
    await eventually(lambda: backend.calls == 1, what="the call reaching the model")
    assert value(samples(gateway.metrics.registry), "ragserve_requests_in_flight", service="Embed") == 1
    assert not call.done()
    await call
    assert value(samples(gateway.metrics.registry), "ragserve_requests_in_flight", service="Embed") == 0


async def test_rejections_by_reason(stack):
    backend, client, gateway = stack
    with pytest.raises(ragserve.InvalidArgumentError):
        await client.embed([""])
    backend.delay = 3.0  # the two admitted calls hold both permits while the others arrive
    results = await asyncio.gather(*(client.embed([f"text {i}"], timeout=30) for i in range(4)), return_exceptions=True)
    overloaded = sum(isinstance(r, ragserve.OverloadedError) for r in results)
    assert overloaded == 2  # capacity 2
    scrape = samples(gateway.metrics.registry)
    assert value(scrape, "ragserve_rejections_total", service="Embed", reason="invalid_input") == 1
    assert value(scrape, "ragserve_rejections_total", service="Embed", reason="overload") == 2
    assert value(scrape, "ragserve_requests_total", service="Embed", method="Embed", code="RESOURCE_EXHAUSTED") == 2
    assert value(scrape, "ragserve_requests_total", service="Embed", method="Embed", code="INVALID_ARGUMENT") == 1


async def test_triton_batch_sizes_from_statistics(stack):
    _, _, gateway = stack
    await eventually(
        lambda: value(samples(gateway.metrics.registry), "ragserve_triton_batch_size_count", model="minilm") == 7,
        what="the statistics poll",
    )
    scrape = samples(gateway.metrics.registry)
    # fake statistics: 4 executions of 1 row, 2 of 8, 1 of 64
    assert value(scrape, "ragserve_triton_batch_size_bucket", model="minilm", le="1.0") == 4
    assert value(scrape, "ragserve_triton_batch_size_bucket", model="minilm", le="8.0") == 6
    assert value(scrape, "ragserve_triton_batch_size_bucket", model="minilm", le="32.0") == 6
    assert value(scrape, "ragserve_triton_batch_size_bucket", model="minilm", le="+Inf") == 7
    assert value(scrape, "ragserve_triton_batch_size_count", model="minilm") == 7
    assert value(scrape, "ragserve_triton_batch_size_sum", model="minilm") == 4 + 16 + 64


def test_batch_collector_without_statistics_exposes_an_empty_family():
    collector = TritonBatchCollector()
    (family,) = list(collector.collect())
    assert family.name == "ragserve_triton_batch_size" and family.samples == []


def test_generation_record_gives_ttft_and_inter_token_latency():
    metrics = GatewayMetrics()
    record = RequestRecord("Generate", "GenerateStream", "r1")
    record.started = 100.0
    record.first_token_at = 100.25
    record.token_times = [100.25, 100.30, 100.40, 100.40]  # the last two arrived together
    record.prompt_tokens, record.completion_tokens, record.duration = 12, 4, 0.5
    metrics.call_started(record)
    metrics.call_finished(record, "OK")
    scrape = samples(metrics.registry)
    labels = {"service": "Generate", "method": "GenerateStream"}
    assert value(scrape, "ragserve_time_to_first_token_seconds_count", **labels) == 1
    assert value(scrape, "ragserve_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.25)
    assert value(scrape, "ragserve_inter_token_latency_seconds_count", **labels) == 3
    assert value(scrape, "ragserve_inter_token_latency_seconds_sum", **labels) == pytest.approx(0.15)
    assert value(scrape, "ragserve_tokens_total", service="Generate", kind="completion") == 4
    assert value(scrape, "ragserve_tokens_total", service="Generate", kind="prompt") == 12


def test_each_gateway_has_its_own_registry():
    a, b = GatewayMetrics(), GatewayMetrics()  # the global registry would refuse the second
    a.requests.labels("Embed", "Embed", "OK").inc()
    assert value(samples(b.registry), "ragserve_requests_total", service="Embed", method="Embed", code="OK") == 0


async def test_request_id_generated_when_absent_and_logged(stack):
    _, _, gateway = stack
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        # merge_contextvars as configured in logging_setup: request_id, service, method are bound per call
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            call = stub.Embed(embed_pb2.EmbedRequest(inputs=["hello there"]), timeout=10)
            await call
            metadata = await call.trailing_metadata()
            bad = stub.Embed(embed_pb2.EmbedRequest(inputs=[""]), metadata=[("x-request-id", "mine-1")], timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await bad
    assert ("x-request-id", "mine-1") in tuple(error.value.trailing_metadata())
    generated = metadata["x-request-id"]
    assert len(generated) == 32
    access = [e for e in logs if e["event"] == "rpc"]
    assert [(e["request_id"], e["status"]) for e in access] == [(generated, "OK"), ("mine-1", "INVALID_ARGUMENT")]
    for line in access:
        assert {"service", "method", "duration_ms", "prompt_tokens", "completion_tokens"} <= line.keys()
        assert (line["service"], line["method"]) == ("Embed", "Embed")
    assert access[0]["prompt_tokens"] == 4
    # the error is logged once, with its cause, under the caller's request id
    (rejected,) = [e for e in logs if e["event"] == "rpc_rejected"]
    assert rejected["request_id"] == "mine-1" and "empty" in rejected["error"]


def test_metrics_endpoint_serves_the_registry_and_reports_a_taken_port():
    import socket
    import urllib.request

    metrics = GatewayMetrics()
    metrics.requests.labels("Embed", "Embed", "OK").inc(3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert 'ragserve_requests_total{code="OK",method="Embed",service="Embed"} 3.0' in reply.read().decode()
        with pytest.raises(RuntimeError, match="--metrics-port"):
            GatewayMetrics().serve("127.0.0.1", port)
    finally:
        metrics.close()


async def test_spent_deadline_is_a_deadline_rejection_and_a_cancel_is_none(stack):
    backend, client, gateway = stack
    backend.delay = 2.0
    with pytest.raises(ragserve.DeadlineExceededError):
        await client.embed(["slow"], timeout=0.2)
    task = asyncio.create_task(client.embed(["cancelled by its caller"], timeout=10))
    await eventually(lambda: backend.calls == 2, what="the second call reaching the model")
    task.cancel()

    def both_counted():  # the handlers see the deadline / the cancel and finish
        scrape = samples(gateway.metrics.registry)
        codes = [value(scrape, "ragserve_requests_total", service="Embed", method="Embed", code=c) for c in ("DEADLINE_EXCEEDED", "CANCELLED")]
        return scrape if codes == [1, 1] else None

    scrape = await eventually(both_counted, what="both calls counted")
    assert value(scrape, "ragserve_requests_total", service="Embed", method="Embed", code="DEADLINE_EXCEEDED") == 1
    assert value(scrape, "ragserve_requests_total", service="Embed", method="Embed", code="CANCELLED") == 1
    assert value(scrape, "ragserve_rejections_total", service="Embed", reason="deadline") == 1
    assert not any(name == "ragserve_rejections_total" and ("reason", "cancelled") in labels for name, labels in scrape)


async def test_coalescer_counts_calls_in_and_triton_requests_out(stack):
    backend, _, gateway = stack
    backend.delay = 0.05  # the model is busy: calls that arrive meanwhile are joined
    async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0) as client:
        # Two at a time (max_concurrent_requests=2 in this stack), four times over.
        for _ in range(4):
            await asyncio.gather(client.embed(["one query"]), client.embed(["another query"]))
    scrape = samples(gateway.metrics.registry)
    calls = value(scrape, "ragserve_coalescer_calls_total", model="minilm")
    requests = value(scrape, "ragserve_coalescer_triton_requests_total", model="minilm")
    assert calls == 8 and requests == backend.calls
    assert 0 < requests <= calls
