"""Where a single-sentence Embed call's latency goes at concurrency 1: the same sentences,
one call at a time, up the stack, interleaved over rounds (median p50 shown):

    raw          ONNX Runtime in-process, the fused graph at batch 1, spinning off as deployed
    triton       tritonclient (grpc.aio) straight to Triton, pre-tokenized (the python backend's hop)
    gateway      ragserve's gateway in front of that Triton (tokenizing, gRPC twice)

and two floors with no model, measured the same way: a grpc.aio server that answers at once
(bench/echo_server.py), and the gateway in front of the tests' fake backend
(bench/gateway_floor_server.py); their difference is what the gateway's own work adds. Beside
the gateway rows, issue 23's changes undone in the same run: the real gateway on asyncio's own
loop (--event-loop asyncio), and the floor with every kept cut undone (--undo ...).

Each step's extra time is what that layer costs. Triton's statistics (queue, compute_infer:
the python-backend hop plus the model, success: the request inside Triton) split the Triton
step, and the gateway's own stage histograms (it runs with a metrics port) split its part.

    .venv/bin/python bench/latency_ladder.py [--calls 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from embed_bench import BUCKET, naive_stack, percentile, script_server, sentences, tokenized  # noqa: E402
from ragserve.v1 import embed_pb2, embed_pb2_grpc  # noqa: E402
from ragserve_server.models.registry import FUSED_ONNX, ORT_ALLOW_SPINNING  # noqa: E402
from support import GatewayProcess, free_port, start_triton  # noqa: E402

def raw(session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, calls: int) -> list[float]:
    latencies = []
    for i in range(calls):
        t0 = time.perf_counter()
        session.run(None, {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]})
        latencies.append(time.perf_counter() - t0)
    return latencies


async def triton_direct(url: str, ids: np.ndarray, mask: np.ndarray, calls: int) -> list[float]:
    client = triton_aio.InferenceServerClient(url)
    latencies = []
    try:
        for i in range(calls):
            inputs = [triton_aio.InferInput(name, [1, BUCKET], "INT64") for name in ("input_ids", "attention_mask")]
            inputs[0].set_data_from_numpy(ids[i : i + 1])
            inputs[1].set_data_from_numpy(mask[i : i + 1])
            t0 = time.perf_counter()
            await client.infer("minilm", inputs, outputs=[triton_aio.InferRequestedOutput("embedding")])
            latencies.append(time.perf_counter() - t0)
    finally:
        await client.close()
    return latencies


async def through_gateway(address: str, texts: list[str], calls: int) -> list[float]:
    latencies = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        for i in range(calls):
            t0 = time.perf_counter()
            await stub.Embed(embed_pb2.EmbedRequest(inputs=[texts[i]]), timeout=30)
            latencies.append(time.perf_counter() - t0)
    return latencies


def stage_means(metrics_url: str) -> dict[str, float]:
    """Mean ms per Embed call of each gateway stage, and of the whole call as the gateway sees it."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    sums: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        found = re.match(r'ragserve_(stage|request)_duration_seconds_(sum|count)\{([^}]*)\} (\S+)', line)
        if found and 'method="Embed"' in found.group(3):
            stage = re.search(r'stage="([^"]+)"', found.group(3))
            name = stage.group(1) if stage else "whole call (in the gateway)"
            sums.setdefault(name, {})[found.group(2)] = float(found.group(4))
    return {name: v["sum"] / v["count"] * 1000 for name, v in sums.items() if v.get("count")}


FLOOR_ECHO = "gRPC floor: echo server"
FLOOR_GATEWAY = "gateway, fake backend (no Triton)"
GATEWAY_ASYNCIO = "  the same, --event-loop asyncio"
FLOOR_UNDONE = "  the same, issue 23's cuts undone"
# bench/gateway_floor_server.py with every kept change of issue 23 undone (bench/profile_embed.py's rows).
UNDONE = ("--undo", "metrics", "--undo", "access-log", "--undo", "request-id", "--undo", "stages",
          "--undo", "interceptor", "--event-loop", "asyncio")
TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output", "success")


def triton_phases(http_port: int) -> dict[str, tuple[int, int]]:
    """Triton's cumulative (count, ns) per phase of the minilm model (its statistics API)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/minilm/stats", timeout=5) as reply:
        stats = json.loads(reply.read())["model_stats"][0]["inference_stats"]
    return {phase: (int(stats[phase]["count"]), int(stats[phase]["ns"])) for phase in TRITON_PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls per setup and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    texts = sentences(args.calls + 1)
    ids, mask = tokenized(texts)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
    session = ort.InferenceSession(str(ROOT / "model_repository/minilm/1" / FUSED_ONNX), options, providers=["CPUExecutionProvider"])
    p50s: dict[str, list[float]] = {}
    means: dict[str, list[float]] = {}  # the mean, to set beside Triton's and the gateway's means
    phases: dict[str, dict[str, list[int]]] = {}  # setup -> Triton phase -> [count, ns]
    with tempfile.TemporaryDirectory(prefix="ragserve-ladder-") as tmp:
        triton = start_triton(Path(tmp) / "triton", ["minilm"])
        try:
            gateway = GatewayProcess(triton.grpc_url, ["minilm"], Path(tmp) / "gateway.log", metrics_port=free_port()).wait_serving()
            # Issue 23's changes undone where a flag can: the same gateway on asyncio's own loop.
            asyncio_gateway = GatewayProcess(
                triton.grpc_url, ["minilm"], Path(tmp) / "gateway-asyncio.log", "--event-loop", "asyncio"
            ).wait_serving()
            floors = contextlib.ExitStack()
            try:
                echo = floors.enter_context(naive_stack("echo_server.py"))
                # quiet: its JSON line per call, as deployed, but not onto this table's terminal
                gateway_floor = floors.enter_context(naive_stack("gateway_floor_server.py", quiet=True))
                undone_floor = floors.enter_context(script_server("gateway_floor_server.py", True, UNDONE))[0]
                for round_ in range(args.rounds):
                    setups = [  # reaches_triton: its Triton phases are read around it
                        ("raw ONNX Runtime, fused, batch 1", False, lambda: raw(session, ids, mask, args.calls)),
                        ("Triton direct (tritonclient aio)", True, lambda: asyncio.run(triton_direct(triton.grpc_url, ids, mask, args.calls))),
                        ("ragserve gateway + Triton", True, lambda: asyncio.run(through_gateway(gateway.address, texts, args.calls))),
                        (GATEWAY_ASYNCIO, True, lambda: asyncio.run(through_gateway(asyncio_gateway.address, texts, args.calls))),
                        (FLOOR_ECHO, False, lambda: asyncio.run(through_gateway(echo, texts, args.calls))),
                        (FLOOR_GATEWAY, False, lambda: asyncio.run(through_gateway(gateway_floor, texts, args.calls))),
                        (FLOOR_UNDONE, False, lambda: asyncio.run(through_gateway(undone_floor, texts, args.calls))),
                    ]
                    if round_ % 2:  # the second of two gateways on one Triton gains from going second: alternate
                        setups[2], setups[3] = setups[3], setups[2]
                    for name, reaches_triton, run in setups:
                        before = triton_phases(triton.ports.http) if reaches_triton else None
                        latencies = run()
                        p50s.setdefault(name, []).append(percentile(latencies, 50) * 1000)
                        means.setdefault(name, []).append(sum(latencies) / len(latencies) * 1000)
                        if before is not None:
                            after = triton_phases(triton.ports.http)
                            for phase in TRITON_PHASES:
                                spent = phases.setdefault(name, {}).setdefault(phase, [0, 0])
                                spent[0] += after[phase][0] - before[phase][0]
                                spent[1] += after[phase][1] - before[phase][1]
                stages = stage_means(gateway.metrics_url)
            finally:
                floors.close()
                asyncio_gateway.stop()
                gateway.stop()
        finally:
            triton.stop()
    print(f"\nsingle-sentence Embed at concurrency 1, {args.calls} calls per setup, median p50 of {args.rounds} interleaved rounds")
    print(f"{'setup':36} {'p50 ms':>7} {'+ over the step below':>22} {'mean ms':>8}")
    below = None
    for name, values in p50s.items():
        value = sorted(values)[len(values) // 2]
        mean = sorted(means[name])[len(means[name]) // 2]
        if name == FLOOR_ECHO:
            print("\nfloors, no model (the gateway's own work is the second minus the first):")
            below = None
        undone = name in (GATEWAY_ASYNCIO, FLOOR_UNDONE)  # set beside the row above it, not a step
        step = f"{value - below:+.2f}" if below is not None else ""
        print(f"{name:36} {value:7.2f} {step + (' (vs the row above)' if undone else ''):>22} {mean:8.2f}")
        if not undone:
            below = value
    print("\nTriton's own phases (mean ms per request, its statistics API; compute_infer includes the")
    print("python-backend hop to the stub and back, so compute_infer minus raw is that hop):")
    print(f"  {'setup':34} " + " ".join(f"{p:>14}" for p in TRITON_PHASES))
    for name, spent in phases.items():
        if spent["success"][0]:
            print(f"  {name:34} " + " ".join(f"{spent[p][1] / max(spent[p][0], 1) / 1e6:14.3f}" for p in TRITON_PHASES))
    print("\nthe gateway's own stage means (ms per call, from its histograms):")
    for name, value in stages.items():
        print(f"  {name:34} {value:7.3f}")


if __name__ == "__main__":
    main()
