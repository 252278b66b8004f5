"""DoS benchmark: what hostile traffic costs the paying callers.

4 interactive callers (2 over gRPC Embed, 2 over HTTP /v1/embeddings, each with a valid key,
one short query at a time with a 20 ms think time) run in their own process for every phase;
the main process is the attacker:

    idle      nothing else
    (a)       20 unauthenticated connections, each POSTing a 30 MiB body to
              /v1/chat/completions (Content-Length 30 MiB, the bytes sent as fast as loopback
              takes them); a new wave of 20 every second (`--flood`: as soon as one is answered)
    (b)       a Generate call with 4 stop strings of 100k characters, once a second
    (c)       600 slow HTTP connections, each sending its request a byte a second
    all       (a), (b) and (c) together

For each phase: the interactive callers' p50 and p99 (ms), their p99 over the idle p99, how many
of their calls failed (must be 0: nothing a paying caller sent is refused), the CPU seconds the
gateway and the attacker (this process) used, and what the attacks got back. On a small
machine the attacker shares the cores with the gateway: its CPU is part of what the callers feel. Loopback only, one Triton (MiniLM and SmolLM2) and one gateway started here,
each phase `--seconds` long; the whole run stops by itself (`--deadline`).

    .venv/bin/python bench/dos_bench.py [--seconds 12] [--deadline 600]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ragserve.v1 import embed_pb2, embed_pb2_grpc, generate_pb2, generate_pb2_grpc  # noqa: E402
from ragserve_server.security.keys import key_line, new_key  # noqa: E402
from support import GatewayProcess, free_port, start_triton  # noqa: E402

QUERY = "how do rivers reach the sea"
MIB = 1024 * 1024


# -- the interactive callers (their own process: the attacker's CPU does not skew them) -----


def interactive(address: str, http_port: int, key: str, seconds: float, out) -> None:
    out.send(asyncio.run(_interactive(address, http_port, key, seconds)))


async def _interactive(address: str, http_port: int, key: str, seconds: float) -> dict:
    import grpc
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    stop_at = time.monotonic() + seconds
    metadata = (("authorization", f"Bearer {key}"),)

    async def grpc_caller() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = embed_pb2_grpc.EmbedStub(channel)
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=[QUERY]), metadata=metadata, timeout=30)
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError as error:
                    failures.append(f"grpc {error.code().name}")
                await asyncio.sleep(0.02)

    async def http_caller() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/embeddings", json={"input": QUERY})
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures.append(f"http {response.status_code}")
                except httpx.HTTPError as error:
                    failures.append(f"http {type(error).__name__}")
                await asyncio.sleep(0.02)

    await asyncio.gather(grpc_caller(), grpc_caller(), http_caller(), http_caller())
    return {"latencies": latencies, "failures": failures}


# -- the attacks ---------------------------------------------------------------------------------


async def big_bodies(port: int, stop_at: float, counts: dict, flood: bool = False) -> None:
    """Waves of 20 unauthenticated 30 MiB bodies, one a second (or back to back)."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        + f"content-length: {30 * MIB}\r\n\r\n".encode()
    )
    chunk = b"[" * MIB

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["a_connect_failed"] += 1
            return
        try:
            writer.write(head)
            for _ in range(30):
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        try:
            status = (await asyncio.wait_for(reader.readline(), 10)).split(b" ")[1:2]
            counts[f"a_{status[0].decode() if status else 'closed'}"] += 1
        except (ConnectionError, OSError, asyncio.TimeoutError, IndexError):
            counts["a_closed"] += 1
        finally:
            writer.close()

    while time.monotonic() < stop_at:
        wave = time.monotonic()
        await asyncio.gather(*(one() for _ in range(20)))
        if not flood:
            await asyncio.sleep(max(0.0, wave + 1.0 - time.monotonic()))


async def long_stops(address: str, key: str, stop_at: float, counts: dict) -> None:
    import grpc

    request = generate_pb2.GenerateRequest(prompt="Tell me a story.", max_tokens=1000, stop=["x" * 100_000] * 4)
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 * MIB)]) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        while time.monotonic() < stop_at:
            try:
                async for _ in stub.GenerateStream(request, metadata=(("authorization", f"Bearer {key}"),), timeout=30):
                    pass
                counts["b_OK"] += 1
            except grpc.aio.AioRpcError as error:
                counts[f"b_{error.code().name}"] += 1
            await asyncio.sleep(1.0)


async def slow_connections(port: int, stop_at: float, counts: dict, n: int = 600) -> None:
    request = b"POST /v1/embeddings HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n{\"input\": \"slowly\"}"

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["c_connect_failed"] += 1
            return
        try:
            for byte in request:
                if time.monotonic() >= stop_at:
                    counts["c_still_open_at_end"] += 1
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                        counts["c_cut_by_server"] += 1
                        return
                    counts["c_answered"] += 1
                    return
                except asyncio.TimeoutError:
                    pass  # nothing back yet: a byte a second
            counts["c_sent_whole_request"] += 1
        except (ConnectionError, OSError):
            counts["c_cut_by_server"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


# -- the phases ----------------------------------------------------------------------------------


def run_phase(name: str, attacks, gateway, http_port: int, key: str, seconds: float) -> dict:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    caller = context.Process(target=interactive, args=(gateway.address, http_port, key, seconds, sender))
    counts: dict = {}

    class Counts(dict):
        def __missing__(self, k):
            return 0

    counts = Counts()
    caller.start()
    gateway_cpu, own_cpu = _cpu_seconds(gateway.process.pid), time.process_time()

    async def attack() -> None:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(a(stop_at, counts) for a in attacks))

    if attacks:
        asyncio.run(attack())
    result = receiver.recv()
    gateway_cpu, own_cpu = _cpu_seconds(gateway.process.pid) - gateway_cpu, time.process_time() - own_cpu
    caller.join(30)
    latencies = sorted(result["latencies"])
    return {
        "phase": name,
        "calls": len(latencies),
        "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else float("nan"),
        "failed": len(result["failures"]),
        "failures": sorted(set(result["failures"])),
        "gateway_cpu": gateway_cpu,
        "attacker_cpu": own_cpu,
        "attacks": dict(sorted(counts.items())),
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each phase")
    parser.add_argument("--deadline", type=float, default=600.0, help="the whole run stops after this many seconds")
    parser.add_argument("--flood", action="store_true", help="(a): a new wave as soon as the last is answered, not once a second")
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dos_bench_"))
    key = new_key()
    (work / "keys.jsonl").write_text(key_line("paying", key) + "\n")
    triton = start_triton(work, ["minilm", "smollm2"])
    http_port = free_port()
    gateway = GatewayProcess(
        triton.grpc_url, ["minilm", "smollm2"], work / "gateway.log",
        "--api-keys-file", str(work / "keys.jsonl"), "--http-port", str(http_port),
    )
    rows = []
    try:
        gateway.wait_serving(timeout=120)
        port, address = http_port, gateway.address
        phases = [
            ("idle", []),
            ("(a) 20 x 30 MiB unauthenticated", [lambda s, c: big_bodies(port, s, c, args.flood)]),
            ("(b) 4 stops x 100k chars", [lambda s, c: long_stops(address, key, s, c)]),
            ("(c) 600 slow connections", [lambda s, c: slow_connections(port, s, c)]),
            ("(a)+(b)+(c)", [lambda s, c: big_bodies(port, s, c, args.flood), lambda s, c: long_stops(address, key, s, c), lambda s, c: slow_connections(port, s, c)]),
            ("idle again", []),
        ]
        for name, attacks in phases:
            if time.monotonic() - started + args.seconds + 30 > args.deadline:
                print(f"deadline: {name} and later phases skipped", file=sys.stderr)
                break
            rows.append(run_phase(name, attacks, gateway, http_port, key, args.seconds))
            print(f"  {rows[-1]['phase']}: {rows[-1]['calls']} calls, p99 {rows[-1]['p99']:.1f} ms", file=sys.stderr, flush=True)
    finally:
        gateway.stop()
        triton.stop()
    idle = rows[0]["p99"] if rows else float("nan")
    waves = "back to back" if args.flood else "a wave a second"
    print(f"\nDoS benchmark: 4 interactive callers (2 gRPC Embed + 2 HTTP /v1/embeddings, paying key), {args.seconds:g} s a phase, (a) {waves}\n")
    print(f"{'phase':34} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99/idle':>9} {'failed':>7} {'gw cpu s':>9} {'att cpu s':>9}  attacks got")
    for row in rows:
        attacks = ", ".join(f"{k} {v}" for k, v in row["attacks"].items()) or "-"
        print(
            f"{row['phase']:34} {row['calls']:6d} {row['p50']:8.1f} {row['p99']:8.1f} {row['p99'] / idle:9.2f} {row['failed']:7d} "
            f"{row['gateway_cpu']:9.2f} {row['attacker_cpu']:9.2f}  {attacks}"
        )
        if row["failures"]:
            print(f"{'':34} paying callers' failures: {', '.join(row['failures'])}")


if __name__ == "__main__":
    main()
