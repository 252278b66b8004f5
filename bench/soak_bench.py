"""A bounded soak: mixed load on the whole stack, memory at the start and the end, every status.

    .venv/bin/python bench/soak_bench.py [--minutes 10] [--generate]

Starts `python -m ragserve_server` with the bundled Triton on loopback, warms it up, then runs
for `--minutes`: 6 Embed callers (1-8 sentences), 2 Rerank callers (10 documents), 1 bad
caller (invalid requests), and with `--generate` 1 GenerateStream caller (32 tokens), all with
deadlines; it stops by itself. Prints the resident memory (RSS) of the gateway and of Triton
with its python-backend stubs at the start and the end, and the count of every status code
per method.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ragserve.v1 import embed_pb2, embed_pb2_grpc, generate_pb2, generate_pb2_grpc, rerank_pb2, rerank_pb2_grpc  # noqa: E402
from support import descendants, free_port, wait_for_health  # noqa: E402

WORDS = "retrieval ranking vector index passage query answer model latency cluster shard token".split()


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    for candidate in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))


async def run_load(address: str, seconds: float, generate: bool) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    end = time.monotonic() + seconds

    async def loop(name, call) -> None:
        rng = random.Random(name)
        while time.monotonic() < end:
            try:
                await call(rng)
                counts[(name, "OK")] += 1
            except grpc.aio.AioRpcError as exc:
                counts[(name, exc.code().name)] += 1
                await asyncio.sleep(0.05)

    async with grpc.aio.insecure_channel(address) as channel:
        embed, rerank, gen = embed_pb2_grpc.EmbedStub(channel), rerank_pb2_grpc.RerankStub(channel), generate_pb2_grpc.GenerateStub(channel)

        async def embed_call(rng):
            await embed.Embed(embed_pb2.EmbedRequest(inputs=[sentence(rng) for _ in range(rng.randint(1, 8))]), timeout=10)

        async def rerank_call(rng):
            await rerank.Rerank(rerank_pb2.RerankRequest(query=sentence(rng), documents=[sentence(rng) for _ in range(10)]), timeout=10)

        async def bad_call(rng):
            await embed.Embed(embed_pb2.EmbedRequest(inputs=[""] if rng.random() < 0.5 else [], dimensions=9999), timeout=5)

        async def generate_call(rng):
            request = generate_pb2.GenerateRequest(messages=[generate_pb2.ChatMessage(role="user", content=sentence(rng))], max_tokens=32)
            async for _ in gen.GenerateStream(request, timeout=60):
                pass

        loops = [loop(f"Embed#{i}", embed_call) for i in range(6)]
        loops += [loop(f"Rerank#{i}", rerank_call) for i in range(2)]
        loops += [loop("Embed(bad)", bad_call)]
        if generate:
            loops.append(loop("GenerateStream", generate_call))
        await asyncio.gather(*loops)
    merged: collections.Counter = collections.Counter()
    for (name, code), count in counts.items():
        merged[(name.split("#")[0], code)] += count
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--generate", action="store_true", help="add a GenerateStream caller (loads SmolLM2 too)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak."))
    port = free_port()
    log_path = work / "gateway.log"
    models = "minilm,smollm2" if args.generate else "minilm"
    with open(log_path, "ab") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "ragserve_server", "--port", str(port), "--metrics-port", "0", "--log-format", "json",
             "--log-level", "warning", "--triton-models", models, "--triton-http-port", str(free_port()),
             "--triton-grpc-port", str(free_port()), "--triton-metrics-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        address = f"127.0.0.1:{port}"
        wait_for_health(address, timeout=180)
        asyncio.run(run_load(address, 20, args.generate))  # warm-up, not counted
        triton_pid = next(d for d in descendants(gateway.pid) if "tritonserver" in Path(f"/proc/{d}/cmdline").read_text())
        start = (rss_mb(gateway.pid) - rss_mb(triton_pid), rss_mb(triton_pid))
        counts = asyncio.run(run_load(address, args.minutes * 60, args.generate))
        end = (rss_mb(gateway.pid) - rss_mb(triton_pid), rss_mb(triton_pid))
        print(f"\nsoak: {args.minutes:g} min of mixed load ({models})")
        print(f"{'process':<28}{'RSS start MB':>14}{'RSS end MB':>12}{'change':>9}")
        for name, a, b in (("gateway", start[0], end[0]), ("Triton + python stubs", start[1], end[1])):
            print(f"{name:<28}{a:>14.0f}{b:>12.0f}{(b - a) / a:>+9.1%}")
        print(f"\n{'method':<18}{'status':<22}{'count':>8}")
        for (name, code), count in sorted(counts.items()):
            print(f"{name:<18}{code:<22}{count:>8}")
        print(json.dumps({"rss_start_mb": start, "rss_end_mb": end}), file=sys.stderr)
    finally:
        gateway.terminate()
        gateway.wait(60)


if __name__ == "__main__":
    main()
