"""Every Prometheus metric of the gateway, declared here and nowhere else.

Handlers never touch Prometheus: the call guard (each front's method wrapper) opens a `RequestRecord` per call and
calls `GatewayMetrics.call_started(record)` / `call_finished(record, code)`, which turn the
record into samples. Each gateway owns its registry (not prometheus_client's global one),
so several gateways can live in one process (tests).

Metrics scraped from the gateway (`--metrics-port`, default 9000):

    ragserve_requests_total{service,method,code}            calls by final status code
    ragserve_requests_in_flight{service}                    calls running now
    ragserve_request_duration_seconds{service,method}       whole call, histogram
    ragserve_stage_duration_seconds{service,method,stage}   admission, tokenize, triton, respond
    ragserve_rejections_total{service,reason}               overload, invalid_input, deadline, ...
    ragserve_key_requests_total{key,code}                   calls by API key name (keys on) and status
    ragserve_tokens_total{service,kind}                     kind: prompt, completion
    ragserve_triton_input_tokens_total{service,kind}        kind: real, padding (bucket padding)
    ragserve_padding_efficiency_ratio{service}              real / padded tokens per call
    ragserve_triton_batch_size{model}                       batch sizes Triton executed (its statistics)
    ragserve_triton_replica_up{replica}                     1 while a Triton replica answers ready
    ragserve_triton_replica_ready_models{replica}           models ready on that replica
    ragserve_triton_replica_calls_total{replica}            Triton calls sent to that replica
    ragserve_triton_replica_failures_total{replica}         of those, failed (retried or not)
    ragserve_triton_retries_total                           calls retried on another replica
    ragserve_coalescer_calls_total{model}                   encoder requests into the gateway's coalescer
    ragserve_coalescer_triton_requests_total{model}         Triton requests out of it (joined: fewer)
    ragserve_time_to_first_token_seconds{service,method}    Generate
    ragserve_inter_token_latency_seconds{service,method}    Generate

Scraped from Triton's own metrics port (8002) by Prometheus directly, not proxied here:
`nv_inference_*` per model, and the generation engine's custom metrics
`ragserve_engine_running_sequences` / `ragserve_engine_waiting_sequences`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ragserve_server.observability.loop_metrics import Counter, Gauge, Histogram  # lock-free: the event loop writes them
from ragserve_server.observability.request_record import RequestRecord

log = structlog.get_logger("ragserve.metrics")

# Sub-millisecond stages (admission, respond) up to long generations.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
)
# Decode steps of a small model on CPU take tens of ms; on GPU a few ms.
TOKEN_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
)
EFFICIENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

STAGES = ("admission", "tokenize", "triton", "respond")


class GatewayMetrics:
    """The gateway's metrics on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragserve_requests", "Calls by service, method and final gRPC status code.", ["service", "method", "code"], registry=r
        )
        self.in_flight = Gauge("ragserve_requests_in_flight", "Calls running now.", ["service"], registry=r)
        self.duration = Histogram(
            "ragserve_request_duration_seconds",
            "Whole call in the gateway, from the method wrapper's entry to its exit.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "ragserve_stage_duration_seconds",
            "Time per stage of a call: admission, tokenize (incl. worker queue), triton (queue + compute), respond.",
            ["service", "method", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "ragserve_rejections", "Calls answered with an error, by reason.", ["service", "reason"], registry=r
        )
        self.key_requests = Counter(
            "ragserve_key_requests", "Calls by API key name and final status (quota refusals: RESOURCE_EXHAUSTED).", ["key", "code"], registry=r
        )
        self.tokens = Counter("ragserve_tokens", "Tokens processed: prompt or completion.", ["service", "kind"], registry=r)
        self.triton_tokens = Counter(
            "ragserve_triton_input_tokens",
            "Token positions sent to Triton: real tokens and length-bucket padding.",
            ["service", "kind"],
            registry=r,
        )
        self.padding_efficiency = Histogram(
            "ragserve_padding_efficiency_ratio",
            "Real tokens over padded tokens sent to Triton, per call.",
            ["service"],
            buckets=EFFICIENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ragserve_time_to_first_token_seconds",
            "Generate: from the call's start to its first generated token.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "ragserve_inter_token_latency_seconds",
            "Generate: time between consecutive generated tokens.",
            ["service", "method"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.triton_batches = TritonBatchCollector()
        r.register(self.triton_batches)
        self.replicas = ReplicaCollector()
        r.register(self.replicas)
        self.coalescing = CoalescerCollector()
        r.register(self.coalescing)
        self._http = None
        # (metric, label values) -> its child. labels() takes a lock and checks its values on
        # every call: about 11 a call, 2-3 us each. The label values are the metrics' own small sets.
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *values: str):
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def call_started(self, record: RequestRecord) -> None:
        self._child(self.in_flight, record.service).inc()

    def call_finished(self, record: RequestRecord, code: str) -> None:
        service, method = record.service, record.method
        child = self._child
        child(self.in_flight, service).dec()
        child(self.requests, service, method, code).inc()
        child(self.duration, service, method).observe(record.duration)
        for stage, seconds in record.stages.items():
            child(self.stage_duration, service, method, stage).observe(seconds)
        if record.error_reason is not None:
            child(self.rejections, service, record.error_reason).inc()
        if record.key_name is not None:
            child(self.key_requests, record.key_name, code).inc()
        if record.prompt_tokens:
            child(self.tokens, service, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            child(self.tokens, service, "completion").inc(record.completion_tokens)
        if record.padded_tokens:
            child(self.triton_tokens, service, "real").inc(record.real_tokens)
            child(self.triton_tokens, service, "padding").inc(record.padded_tokens - record.real_tokens)
            child(self.padding_efficiency, service).observe(record.real_tokens / record.padded_tokens)
        times = record.token_times
        first = record.first_token_at if record.first_token_at is not None else (times[0] if times else None)
        if first is not None:
            child(self.ttft, service, method).observe(first - record.started)
        if len(times) > 1:
            inter_token = child(self.inter_token, service, method)
            for before, after in zip(times, times[1:]):
                inter_token.observe(after - before)

    def serve(self, host: str, port: int) -> None:
        """Serves /metrics over HTTP on a daemon thread (prometheus_client's server)."""
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"could not bind the metrics port {host}:{port} (--metrics-port): {exc}") from exc

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None


class ReplicaCollector(Collector):
    """Per-replica state and counters, read from the replica set's stats at scrape time."""

    def __init__(self) -> None:
        self.source = None  # the ReplicaSet, once the gateway has one

    def collect(self):
        if self.source is None:
            return
        up = GaugeMetricFamily("ragserve_triton_replica_up", "1 while the Triton replica answers ready.", labels=["replica"])
        ready = GaugeMetricFamily(
            "ragserve_triton_replica_ready_models", "Models ready (and matching the registry) on the replica.", labels=["replica"]
        )
        calls = CounterMetricFamily("ragserve_triton_replica_calls", "Triton calls sent to the replica.", labels=["replica"])
        failures = CounterMetricFamily(
            "ragserve_triton_replica_failures", "Triton calls that failed on the replica (retried or not).", labels=["replica"]
        )
        for stats in self.source.stats():
            up.add_metric([stats.address], 1.0 if stats.up else 0.0)
            ready.add_metric([stats.address], float(len(stats.ready_models)))
            calls.add_metric([stats.address], stats.calls)
            failures.add_metric([stats.address], stats.failures)
        retries = CounterMetricFamily("ragserve_triton_retries", "Calls retried once on another Triton replica.")
        retries.add_metric([], self.source.retries)
        yield from (up, ready, calls, failures, retries)


class CoalescerCollector(Collector):
    """Encoder requests in and Triton requests out of the gateway's coalescer (coalescer.py)."""

    def __init__(self) -> None:
        self.source = None  # the Coalescer, when coalescing is on

    def collect(self):
        if self.source is None:
            return
        calls = CounterMetricFamily(
            "ragserve_coalescer_calls", "Encoder requests the services made (a call makes one per length bucket).", labels=["model"]
        )
        requests = CounterMetricFamily(
            "ragserve_coalescer_triton_requests", "Triton requests those became (fewer: joined while Triton was busy).", labels=["model"]
        )
        for model, (made, sent) in sorted(self.source.counts.items()):
            calls.add_metric([model], made)
            requests.add_metric([model], sent)
        yield from (calls, requests)


class TritonBatchCollector(Collector):
    """`ragserve_triton_batch_size{model}`: the batch sizes Triton actually executed.

    Built from Triton's ModelStatistics `batch_stats` (executions per batch size, counted
    since Triton started), which a task on the gateway's event loop polls; scrapes read the
    last snapshot, so a scrape never waits on Triton.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[str, dict[int, int]] = {}

    def update(self, model: str, executions_by_size: dict[int, int]) -> None:
        with self._lock:
            self._snapshot[model] = dict(executions_by_size)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "ragserve_triton_batch_size",
            "Batch sizes (rows) of the executions Triton ran, from its statistics since it started.",
            labels=["model"],
        )
        with self._lock:
            snapshot = {model: dict(sizes) for model, sizes in self._snapshot.items()}
        for model, sizes in sorted(snapshot.items()):
            buckets, cumulative = [], 0
            for bound in BATCH_SIZE_BUCKETS:
                cumulative = sum(count for size, count in sizes.items() if size <= bound)
                buckets.append((str(float(bound)), cumulative))
            total = sum(sizes.values())
            buckets.append(("+Inf", total))
            family.add_metric([model], buckets, sum_value=float(sum(size * count for size, count in sizes.items())))
        yield family

    async def poll(self, backend, models: Sequence[str], interval: float) -> None:
        """Refreshes the snapshot every `interval` seconds until cancelled."""
        failing = False
        while True:
            try:
                for model in models:
                    self.update(model, await backend.batch_statistics(model))
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Triton down or restarting: keep the last snapshot, retry
                if not failing:
                    log.warning("triton_statistics_unavailable", error=str(exc))
                failing = True
            await asyncio.sleep(interval)
