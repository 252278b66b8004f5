"""Priorities: interactive Embed latency while a bulk EmbedStream job saturates the stack.

    .venv/bin/python bench/priority_bench.py [--queries 300] [--rounds 3]

One Triton (minilm, two CPU instances) and one gateway per setup on loopback, started first:
    two lanes          (the defaults: bulk work has its own admission budget and Triton
                        priority 2, and the coalescer's bulk gate: bulk Triton requests of at
                        most 4 rows, one at a time per model)
    two lanes, no gate (--bulk-rows 0 --bulk-in-flight 0: the gate undone; Triton's batcher
                        joins bulk requests up to 64 rows on every instance)
    one lane           (--lanes one: bulk and interactive share one budget and one priority)
`--setup NAME=FLAGS` (repeatable) measures other gateway flags instead. For each setup,
interactive single-sentence queries (4 callers) are measured alone (idle), then while 2
EmbedStreams each keep up to 64 messages of 16 passages in flight (bulk); before each
measurement Triton is left to finish what an earlier bulk job queued. Rounds are
interleaved; the median round is shown. Goal: p99 under bulk load within 3x idle with two
lanes, bulk throughput not badly lower than without the gate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc  # noqa: E402
from support import GatewayProcess, metric_value, start_triton  # noqa: E402

# name=gateway flags; each is measured idle and under the bulk job, rounds interleaved.
DEFAULT_SETUPS = ["two lanes=--lanes two", "two lanes, no gate=--lanes two --bulk-rows 0 --bulk-in-flight 0", "one lane=--lanes one"]

PASSAGE = "Retrieval systems index passages like this one so that a query can find them later. " * 3


async def interactive(stub, queries: int, callers: int = 4, max_seconds: float = 60.0) -> tuple[float, float, float, int]:
    """(p50 ms, p99 ms, queries/s, errors) of single-sentence calls from `callers` loops, each
    with a 10 s deadline (a timed-out query counts as 10 s and an error); stops after
    `queries` or `max_seconds`."""
    latencies, errors, ok, next_index = [], 0, 0, 0
    stop_at = time.perf_counter() + max_seconds

    async def caller() -> None:
        nonlocal next_index, errors, ok
        while next_index < queries and time.perf_counter() < stop_at:
            next_index += 1
            t0 = time.perf_counter()
            try:
                await stub.Embed(embed_pb2.EmbedRequest(inputs=[f"what is query number {next_index}?"]), timeout=10)
                latencies.append(time.perf_counter() - t0)
                ok += 1
            except grpc.aio.AioRpcError as exc:
                errors += 1
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - start
    return float(np.percentile(latencies, 50) * 1000), float(np.percentile(latencies, 99) * 1000), ok / elapsed, errors


async def bulk_job(stub, stop: asyncio.Event, counter: list[int]) -> None:
    """One EmbedStream sending 16-passage messages until `stop`; counts embedded passages."""

    async def messages():
        i = 0
        while not stop.is_set():
            yield embed_pb2.EmbedStreamRequest(
                id=str(i), request=embed_pb2.EmbedRequest(inputs=[f"{i} {PASSAGE}"] * 16, truncate=common_pb2.TRUNCATE_END)
            )
            i += 1
            await asyncio.sleep(0)

    call = stub.EmbedStream(messages(), timeout=600)
    try:
        async for answer in call:
            if answer.HasField("response"):
                counter[0] += 16
    finally:
        call.cancel()  # cancelling the task alone leaves the RPC running until its window drains


async def scenario(address: str, queries: int, with_bulk: bool) -> tuple[float, float, float, int, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm up"]), timeout=30)
        stop, counter, jobs = asyncio.Event(), [0], []
        if with_bulk:
            jobs = [asyncio.create_task(bulk_job(stub, stop, counter)) for _ in range(2)]
            await asyncio.sleep(2.0)  # let the bulk job fill the queues
        start = time.perf_counter()
        p50, p99, rate, errors = await interactive(stub, queries)
        bulk_rate = counter[0] / (time.perf_counter() - start) if with_bulk else 0.0
        stop.set()
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
    return p50, p99, rate, errors, bulk_rate


def wait_triton_idle(metrics_url: str, timeout: float = 120.0) -> None:
    """Until Triton ran no execution of minilm for a second: a bulk job's requests still queued
    in Triton after its stream was cancelled would otherwise slow the next setup's idle round."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        count = metric_value(metrics_url, "nv_inference_exec_count", model="minilm")
        if count == last:
            return
        last = count
        time.sleep(1.0)
    print(f"warning: Triton still busy after {timeout:.0f}s", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--setup",
        action="append",
        help="a gateway as NAME=FLAGS (repeatable; replaces the default setups), e.g. 'gate=--bulk-rows 8 --bulk-in-flight 1'",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="priority_bench."))
    triton = start_triton(work / "triton", ["minilm"])
    gateways = {}
    try:
        for index, setup in enumerate(args.setup or DEFAULT_SETUPS):
            name, _, flags = setup.partition("=")
            gateways[name] = GatewayProcess(triton.grpc_url, ["minilm"], work / f"gateway-{index}.log", *flags.split()).wait_serving()
        runs: dict[tuple[str, str], list[tuple]] = {}
        width = max(10, *(len(name) + 1 for name in gateways))
        for round_ in range(args.rounds):
            for name, gateway in gateways.items():
                for load in ("idle", "bulk"):
                    wait_triton_idle(triton.metrics_url)
                    result = asyncio.run(scenario(gateway.address, args.queries, load == "bulk"))
                    runs.setdefault((name, load), []).append(result)
                    print(f"round {round_ + 1} {name:<{width}} {load:<4} p50 {result[0]:7.1f} p99 {result[1]:7.1f} ms", file=sys.stderr)
        print(f"\n{'setup':<{width}}{'load':<6}{'p50 ms':>9}{'p99 ms':>9}{'queries/s':>11}{'errors':>8}{'bulk docs/s':>13}{'p99 vs idle':>13}{'vs all idle':>13}")
        # Idle is the same stack in every setup (the setups differ only under bulk): the median of
        # all idle rounds is the steadier baseline on a shared machine; both ratios are shown.
        all_idle_p99 = statistics.median(r[1] for name in gateways for r in runs[(name, "idle")])
        for name in gateways:
            idle_p99 = statistics.median(r[1] for r in runs[(name, "idle")])
            for load in ("idle", "bulk"):
                rounds = sorted(runs[(name, load)], key=lambda r: r[1])
                p50, p99, rate, errors, bulk_rate = rounds[len(rounds) // 2]
                print(f"{name:<{width}}{load:<6}{p50:>9.1f}{p99:>9.1f}{rate:>11.0f}{errors:>8}{bulk_rate:>13.0f}{p99 / idle_p99:>12.2f}x{p99 / all_idle_p99:>12.2f}x")
    finally:
        for gateway in gateways.values():
            gateway.stop()
        triton.stop()


if __name__ == "__main__":
    main()
