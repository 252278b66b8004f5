"""Bulk embedding and embedding formats, against a real Triton + gateway on this machine.

Table 1, indexing N short passages (default 100,000) with the SDK three ways, each in a
fresh child process (so peak memory is its own):
  embed_stream       client.embed_stream(passages): one EmbedStream, 64 texts a message, 8 in flight
  batched unary      client.embed(batch) for each batch of 64, one after another
  one at a time      client.embed([passage]) for each passage (on the first --single-passages
                     only: at ~100/s the whole corpus would take hours; the rate is what counts)
columns: passages/s, peak Python heap of the client (tracemalloc, numpy included), peak RSS.

Table 2, per Embed call of 64 passages for each encoding (float = repeated float,
float32_bytes, int8, binary): response bytes on the wire (protobuf size), the gateway's CPU
per call (utime + stime of the gateway process from /proc/<pid>/stat over the calls), and the
client's time to turn the response into a numpy array. Rounds interleave the encodings; the
median round is shown.

    python bench/embed_formats_bench.py                                # the real numbers
    python bench/embed_formats_bench.py --passages 2000 --rounds 1     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TOPICS = ["billing", "shipping", "returns", "privacy", "accounts", "search", "pricing", "support"]
ENCODINGS = ("float", "float32", "int8", "binary")  # SDK names; "float32" is FLOAT32_BYTES


def passages(n: int) -> list[str]:
    """Short varied passages (~15-25 tokens)."""
    return [
        f"Passage {i}: our {TOPICS[i % 8]} policy changed in {2000 + i % 25}; see section {i % 97} for the {TOPICS[(i // 8) % 8]} details."
        for i in range(n)
    ]


# --- child: one indexing mode, measured in its own process -----------------------------------


def child(mode: str, address: str, n: int, batch: int) -> dict:
    import resource
    import tracemalloc

    import ragserve

    texts = passages(n)
    tracemalloc.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ragserve.Client(address, timeout=120) as client:
        started = time.perf_counter()
        if mode == "embed_stream":
            result = client.embed_stream(texts, batch_size=batch).embeddings
        elif mode == "batched unary":
            result = np.concatenate([client.embed(texts[i : i + batch]).embeddings for i in range(0, n, batch)])
        else:
            result = np.concatenate([client.embed([t]).embeddings for t in texts])
        seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    assert result.shape == (n, 384)
    return {
        "mode": mode,
        "passages": n,
        "rate": n / seconds,
        "heap_mib": peak / 2**20,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
    }


# --- parent -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def formats(address: str, pid: int, calls: int, rounds: int, batch: int) -> dict[str, dict[str, float]]:
    import grpc

    from ragserve import _protocol
    from ragserve.v1 import embed_pb2_grpc

    texts = passages(batch)
    per: dict[str, list[tuple[float, float, float]]] = {e: [] for e in ENCODINGS}
    with grpc.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        stub.Embed(_protocol.embed_request(texts, model=None, normalize=None, truncate=None, dimensions=None, input_type=None), timeout=60)
        for _ in range(rounds):
            for encoding in ENCODINGS:
                request = _protocol.embed_request(
                    texts, model=None, normalize=None, truncate=None, dimensions=None, input_type=None, encoding=encoding
                )
                cpu_before, parse, size = cpu_seconds(pid), 0.0, 0
                for _ in range(calls):
                    response = stub.Embed(request, timeout=60)
                    started = time.perf_counter()
                    _protocol.embeddings_of(response)
                    parse += time.perf_counter() - started
                    size = response.ByteSize()
                per[encoding].append((size, (cpu_seconds(pid) - cpu_before) / calls, parse / calls))
    table = {}
    for encoding, runs in per.items():
        size, cpu, parse = sorted(runs, key=lambda r: r[1])[len(runs) // 2]
        table[encoding] = {"bytes": size, "gateway_cpu_ms": cpu * 1000, "client_parse_ms": parse * 1000}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000, help="passages to index with embed_stream and batched unary calls")
    parser.add_argument("--single-passages", type=int, default=5_000, help="passages for the one-at-a-time mode (capped at --passages)")
    parser.add_argument("--batch", type=int, default=64, help="texts per message / call")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the formats table (median shown)")
    parser.add_argument("--calls", type=int, default=20, help="Embed calls per encoding per round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.address, args.passages, args.batch)))
        return

    from support import GatewayProcess, start_triton

    with tempfile.TemporaryDirectory(prefix="embed_formats_bench.") as tmp:
        work = Path(tmp)
        triton = start_triton(work, ["minilm"])
        try:
            gateway = GatewayProcess(triton.grpc_url, ["minilm"], work / "gateway.log").wait_serving()
            try:
                runs = []
                for mode, n in (
                    ("embed_stream", args.passages),
                    ("batched unary", args.passages),
                    ("one at a time", min(args.single_passages, args.passages)),
                ):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", mode, "--address", gateway.address, "--passages", str(n), "--batch", str(args.batch)],
                        capture_output=True, text=True, check=True,
                    )
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                table = formats(gateway.address, gateway.process.pid, args.calls, args.rounds, args.batch)
            finally:
                gateway.stop()
        finally:
            triton.stop()

    print(f"\nIndexing short passages (batch {args.batch}; this machine: {os.cpu_count()} cores, Triton and gateway on the same cores)\n")
    print("| mode | passages | passages/s | vs one at a time | peak client heap (MiB) | peak client RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    single = runs[-1]["rate"]
    for r in runs:
        print(f"| {r['mode']} | {r['passages']:,} | {r['rate']:.0f} | {r['rate'] / single:.2f}x | {r['heap_mib']:.1f} | {r['rss_mib']:.0f} |")
    print(f"\nOne Embed call of {args.batch} passages per encoding ({args.calls} calls x {args.rounds} rounds, median round)\n")
    print("| encoding | response bytes | vs float | gateway CPU ms/call | client parse ms/call |")
    print("|---|---|---|---|---|")
    base = table["float"]["bytes"]
    for encoding, row in table.items():
        name = "float32_bytes" if encoding == "float32" else encoding
        print(f"| {name} | {row['bytes']:,} | {row['bytes'] / base:.3f} | {row['gateway_cpu_ms']:.2f} | {row['client_parse_ms']:.3f} |")


if __name__ == "__main__":
    main()
