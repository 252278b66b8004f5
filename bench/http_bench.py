"""The same Embed load over gRPC and over HTTP, with tracing off and on, side by side.

    .venv/bin/python bench/http_bench.py [--requests 2000] [--rounds 3] [--concurrency 1 16]

One Triton (MiniLM) and two gateways on loopback: one with tracing off, one with
`--tracing on` exporting every span (the default sampler, parent-based always-on: the worst
case) over OTLP/gRPC to a sink in this process that counts and drops them. Each setup sends
single-sentence calls from a closed loop of `concurrency` callers: gRPC through a grpc.aio
stub, HTTP through one httpx.AsyncClient (keep-alive pool of `concurrency` connections) to
`/v1/embeddings` (encoding_format float). Setups are measured in turn, round after round;
the median round is shown (requests/s, p50, p99). The load generator shares the machine's
cores with the stack: compare the rows with each other, not with other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from embed_bench import sentences  # noqa: E402
from ragserve.v1 import embed_pb2, embed_pb2_grpc  # noqa: E402
from support import GatewayProcess, free_port, start_triton  # noqa: E402


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts spans and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request, context):
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def _closed_loop(call, texts: list[str], concurrency: int, total: int) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def caller() -> None:
        nonlocal next_index, errors
        while next_index < total:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                await call(texts[i % len(texts)])
            except Exception:  # noqa: BLE001 - counted, the load goes on
                errors += 1
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return total / elapsed, float(np.percentile(latencies, 50)) * 1000, float(np.percentile(latencies, 99)) * 1000, errors


async def grpc_load(address: str, texts: list[str], concurrency: int, total: int):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)

        async def call(text: str) -> None:
            await stub.Embed(embed_pb2.EmbedRequest(inputs=[text]), timeout=30)

        await _closed_loop(call, texts, concurrency, min(total, 100))  # warm up
        return await _closed_loop(call, texts, concurrency, total)


async def http_load(base_url: str, texts: list[str], concurrency: int, total: int):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def call(text: str) -> None:
            response = await client.post("/v1/embeddings", json={"input": text, "encoding_format": "float"})
            response.raise_for_status()

        await _closed_loop(call, texts, concurrency, min(total, 100))
        return await _closed_loop(call, texts, concurrency, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="single-sentence calls per setup, level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    texts = sentences(4096)
    work = Path(tempfile.mkdtemp(prefix="http_bench."))

    sink = SpanSink()
    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, collector)
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()

    triton = start_triton(work / "triton", ["minilm"])
    gateways: dict[str, GatewayProcess] = {}
    try:
        for name, extra, env in (
            ("off", [], {}),
            ("on", ["--tracing", "on"], {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_SERVICE_NAME": "ragserve-bench",
            }),
        ):
            http_port = free_port()
            saved = dict(os.environ)
            os.environ.update(env)  # GatewayProcess passes this process's environment on
            try:
                gateway = GatewayProcess(triton.grpc_url, ["minilm"], work / f"gateway-{name}.log", "--http-port", str(http_port), *extra)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            gateway.http_url = f"http://127.0.0.1:{http_port}"
            gateways[name] = gateway.wait_serving()

        setups = {
            "gRPC": lambda c: grpc_load(gateways["off"].address, texts, c, args.requests),
            "HTTP": lambda c: http_load(gateways["off"].http_url, texts, c, args.requests),
            "gRPC traced": lambda c: grpc_load(gateways["on"].address, texts, c, args.requests),
            "HTTP traced": lambda c: http_load(gateways["on"].http_url, texts, c, args.requests),
        }
        runs: dict[tuple[str, int], list[tuple]] = {}
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for name, run in setups.items():
                    result = asyncio.run(run(concurrency))
                    runs.setdefault((name, concurrency), []).append(result)
                    print(f"round {round_ + 1} {name:<12} c{concurrency:<3} {result[0]:7.0f} req/s", file=sys.stderr)

        def median_round(name: str, concurrency: int) -> tuple:
            rounds = sorted(runs[(name, concurrency)], key=lambda r: r[0])
            return rounds[len(rounds) // 2]

        print(f"\n{'setup':<14}{'conc':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs gRPC':>9}")
        for concurrency in args.concurrency:
            base = median_round("gRPC", concurrency)[0]
            for name in setups:
                rate, p50, p99, errors = median_round(name, concurrency)
                print(f"{name:<14}{concurrency:>6}{rate:>9.0f}{p50:>9.2f}{p99:>9.2f}{errors:>8}{rate / base:>8.2f}x")
        print()
        for transport in ("gRPC", "HTTP"):
            costs = [
                1 - median_round(f"{transport} traced", c)[0] / median_round(transport, c)[0] for c in args.concurrency
            ]
            print(f"tracing cost over {transport} (1 - traced / untraced req/s, median over levels): {statistics.median(costs):+.1%}")
        http_cost = [1 - median_round("HTTP", c)[0] / median_round("gRPC", c)[0] for c in args.concurrency]
        print(f"HTTP cost vs gRPC (median over levels): {statistics.median(http_cost):+.1%}")
        print(f"spans received by the sink so far (the batch exporter flushes every 5 s): {sink.spans}")
    finally:
        for gateway in gateways.values():
            gateway.stop()
        triton.stop()
        collector.stop(0)


if __name__ == "__main__":
    main()
