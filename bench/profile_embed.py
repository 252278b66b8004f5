"""Where the CPU of a single-sentence Embed call goes, at concurrency 64 (issue 13's profile).

Starts Triton (minilm) and the gateway on loopback, drives single-sentence Embed calls from
a separate load process, and over the measured window:

* reads every process's and thread's CPU time from /proc (gateway, tritonserver, the
  model's python-backend stub, the load generator) and divides by the calls served;
* samples the gateway and the stub with py-spy (`--native`, so C frames of gRPC, protobuf
  and ONNX Runtime show) and sorts every sample into a part of the call by its frames.

The table it prints is CPU milliseconds per call by part, so parts add up to what one call
costs the machine. Samples are taken of threads that are running (py-spy without --idle).

Then, without py-spy, two servers with no model (the floors of bench/latency_ladder.py):
bench/echo_server.py, a grpc.aio server that answers at once (on asyncio's loop as shipped, and
on uvloop, the gateway's loop), and bench/gateway_floor_server.py, the gateway as deployed in
front of the tests' fake backend; then that gateway with each kept change of issue 23 undone.
Their CPU per call, and its difference (the gateway's own work: interceptor, admission,
tokenizing, request and response building, logging, metrics), two ways: both saturated at
the same concurrency, and both driven at the call rate the real stack served (a grpc.aio
server's CPU per call falls as its rate rises, so the real gateway is compared with the echo
server at its own rate: the real gateway's CPU per call minus the echo server's).

The load is h2load (bench/native_load.py: C, pre-framed gRPC calls, a few % of a core), in a
process of its own; `--load python` uses bench/embed_load.py (grpc.aio callers) instead.

    .venv/bin/python bench/profile_embed.py [--seconds 20] [--concurrency 64] [--repository model_repository]
        [--floor-seconds 10] [--load native|python]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import native_load  # noqa: E402
from embed_bench import script_server, sentences  # noqa: E402
from ragserve.v1 import embed_pb2  # noqa: E402
from support import GatewayProcess, python_backend_stubs, start_triton  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

# Parts of a call, matched against a sample's frames from the innermost outwards: the first
# rule any frame matches names the part (so "tokenize" wins over the executor that runs it).
GATEWAY_PARTS = [
    ("logging and metrics", ("structlog", "logging/__init__", "prometheus_client", "metrics.py", "request_record.py", "logging_setup")),
    ("tokenization", ("tokenizers", "tokenization.py")),
    ("request building (pad, KServe request)", ("encoder.py:rows", "_infer_request", "tokenization.py:pad", "encoder.py:run")),
    ("response building (normalise, EmbedResponse)", ("finish_embeddings", "services/embed.py", "_outputs")),
    ("method wrappers, admission, auth", ("grpc_methods.py", "undone_interceptor.py", "call_scope.py", "admission.py", "auth.py", "tracing.py")),
    ("Triton client (grpc.aio client call)", ("aio/_call.py", "aio/_channel.py", "_interceptor.py", "triton.py", "replicas.py")),
    ("gRPC server (receive, send, C-core)", ("aio/_server", "cygrpc", "libgrpc", "grpc/_", "_cython")),
    ("event loop, thread hop", ("asyncio", "selectors", "concurrent/futures", "threading.py", "queue.py")),
]
STUB_PARTS = [
    ("ONNX Runtime", ("onnxruntime", "libonnxruntime", "session.run", "_run", "MlasGemm", "Mlas")),
    ("python backend IPC (get/put tensors, responses)", ("pb_utils", "triton_python_backend_utils", "InferenceResponse", "get_input_tensor", "Tensor", "Stub", "SharedMemory", "shm", "boost", "ipc", "pb_")),
    ("model.py (concatenate, pad, split)", ("model.py",)),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed)."""
    out: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[_thread_family(name)] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def _thread_family(name: str) -> str:
    return name.rstrip("0123456789-_:") or name


def classify(stack: str, rules) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for part, needles in rules:
            if any(n in frame for n in needles):
                return part
    return "other"


def py_spy(pid: int, seconds: float, out: Path, native: bool = False) -> subprocess.Popen:
    # --native shows C frames (gRPC's C-core, protobuf) but must pause the process per sample:
    # use it for attribution only, never with the CPU figures of the same run.
    mode = ["--native", "--rate", "100"] if native else ["--nonblocking", "--rate", "200"]
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)),
         "--format", "raw", *mode, "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def samples(path: Path, rules) -> dict[str, int]:
    counts: dict[str, int] = collections.Counter()
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            counts[classify(stack, rules)] += int(count)
    return counts


def _own_frames(paths: list[Path]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if count.isdigit():
                    counts[stack.rsplit(";", 1)[-1]] += int(count)
    return counts


TRITON_PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def _executions(triton) -> tuple[int, ...]:
    """minilm's rows computed, model executions, requests, then the ns spent in each of
    TRITON_PHASES so far (summed over requests), from Triton's statistics."""
    import tritonclient.grpc as triton_grpc

    stats = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics("minilm", as_json=True)["model_stats"][0]
    phases = stats["inference_stats"]
    return (
        int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), int(phases.get("success", {}).get("count", 0)),
        *(int(phases.get(phase, {}).get("ns", 0)) for phase in TRITON_PHASES),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--gateway-args", default="", help="extra gateway flags, space-separated")
    parser.add_argument("--top", type=int, default=12, help="functions to list by their own samples, per process")
    parser.add_argument("--native", type=Path, help="also write the gateway's native (C frames) samples here, as raw collapsed stacks")
    parser.add_argument("--floor-seconds", type=float, default=10.0, help="load on each no-model floor server (0: skip them)")
    parser.add_argument("--load", choices=("native", "python"), default="native", help="h2load (default) or grpc.aio callers")
    args = parser.parse_args()
    global LOAD
    LOAD = args.load

    with tempfile.TemporaryDirectory(prefix="ragserve-profile-") as tmp:
        work = Path(tmp)
        triton = start_triton(work, ["minilm"], args.repository)
        gateway = GatewayProcess(triton.grpc_url, ["minilm"], work / "gateway.log", *args.gateway_args.split()).wait_serving()
        try:
            stubs = python_backend_stubs(triton.process.pid)
            # The load generator is its own process, so its CPU is counted apart from ours.
            load = start_load(gateway.address, args.concurrency, args.seconds + 6)
            time.sleep(3)  # warm: the window starts once the load is steady
            pids = {"gateway": gateway.process.pid, "tritonserver": triton.process.pid, "load generator": load.pid}
            pids.update({f"python stub {i}": pid for i, pid in enumerate(stubs)})
            batches_before = _executions(triton)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            threads_before = {name: thread_cpu(pid) for name, pid in pids.items()}
            if args.native:
                spies = {"native": py_spy(gateway.process.pid, args.seconds, args.native, native=True)}
            else:
                spies = {"gateway": py_spy(gateway.process.pid, args.seconds, work / "gateway.spy")}
            spies.update({f"stub{i}": py_spy(pid, args.seconds, work / f"stub{i}.spy") for i, pid in enumerate(stubs)})
            start = time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - start
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            threads_after = {name: thread_cpu(pid) for name, pid in pids.items()}
            batches_after = _executions(triton)
            for spy in spies.values():
                spy.wait(timeout=60)
            calls = calls_in_window(load, start, elapsed)
        finally:
            gateway.stop()
            triton.stop()

        print(f"\nsingle-sentence Embed at concurrency {args.concurrency}: {calls} calls in {elapsed:.1f} s = {calls / elapsed:.0f} calls/s")
        rows, runs, requests, *phase_ns = (a - b for a, b in zip(batches_after, batches_before))
        print(f"Triton: {requests} requests ({calls / max(requests, 1):.1f} calls each), {runs} model executions of {rows / max(runs, 1):.1f} rows on average")
        # Wall time per request inside Triton: "success" is the whole request, the rest its parts.
        phases = ", ".join(f"{name} {ns / max(requests, 1) / 1e6:.2f}" for name, ns in zip(TRITON_PHASES, phase_ns))
        print(f"Triton, ms per request (wall): {phases.replace('success', 'total')}")
        print(f"\n{'process / thread':52} {'CPU ms/call':>11} {'CPU %':>6}")
        total = 0.0
        for name in pids:
            used = after[name] - before[name]
            total += used
            print(f"{name:52} {used * 1000 / calls:11.3f} {used / elapsed:6.0%}")
            for thread, seconds in sorted(threads_after[name].items(), key=lambda kv: -kv[1]):
                spent = seconds - threads_before[name].get(thread, 0.0)
                if spent * 1000 / calls >= 0.01:
                    print(f"  thread {thread:43} {spent * 1000 / calls:11.3f} {spent / elapsed:6.0%}")
        print(f"{'all':52} {total * 1000 / calls:11.3f} {total / elapsed:6.0%}")
        gateway_ms = (after["gateway"] - before["gateway"]) * 1000 / calls
        real_rate = calls / elapsed

        for label, spy_names, rules, process in (
            ("gateway", ["gateway"], GATEWAY_PARTS, "gateway"),
            ("python stub", [s for s in spies if s.startswith("stub")], STUB_PARTS, "python stub 0"),
        ):
            counts: dict[str, int] = collections.Counter()
            for spy in spy_names:
                counts.update(samples(work / f"{spy}.spy", rules))
            n = sum(counts.values())
            if not n or process not in after:
                continue
            sampled_ms = sum(after[p] - before[p] for p in after if p.startswith(process.rsplit(" ", 1)[0])) * 1000 / calls
            print(f"\n{label}: py-spy samples of its Python threads by part (share of samples; ms/call = share x the process's CPU ms/call)")
            for part, count in counts.most_common():
                print(f"  {part:50} {count / n:6.0%} {count / n * sampled_ms:8.3f}")
            print("  the functions its samples were in most (own time):")
            for frame, count in _own_frames([work / f"{spy}.spy" for spy in spy_names]).most_common(args.top):
                print(f"    {count / n:6.1%}  {frame[:110]}")

    if args.floor_seconds > 0:
        print(f"\nfloors with no model at concurrency {args.concurrency} ({LOAD} load; CPU ms per call; {args.floor_seconds:.0f} s each, no py-spy):")
        print(f"  {'server':58} {'server':>7} {'load gen':>8} {'calls/s':>8}")
        floors = {}
        # The gateway runs on uvloop (--event-loop): the echo server is shown on both loops.
        servers = (("echo server (grpc.aio, answers at once)", "echo_server.py", ()),
                   ("echo server on uvloop", "echo_server.py", ("--event-loop", "uvloop")),
                   ("gateway on the fake backend (no Triton)", "gateway_floor_server.py", ()))
        for label, script, extra in servers:
            floors[script, extra] = server_ms, load_ms, rate = floor_cpu(script, args.concurrency, args.floor_seconds, args=extra)
            print(f"  {label + ', saturated':58} {server_ms:7.3f} {load_ms:8.3f} {rate:8.0f}")
        # Each kept change of issue 23 undone (and candidates tried), the same load, in this run.
        for label, extra in FLOOR_VARIANTS:
            server_ms, load_ms, rate = floor_cpu("gateway_floor_server.py", args.concurrency, args.floor_seconds, args=extra)
            print(f"  {'  ' + label:58} {server_ms:7.3f} {load_ms:8.3f} {rate:8.0f}")
        gateway_floor = floors["gateway_floor_server.py", ()][0]
        if LOAD == "native":  # h2load paces calls (--rps): the same rate as the real stack served
            for label, script, extra in servers:
                floors[script, extra, "rate"] = server_ms, load_ms, rate = floor_cpu(
                    script, args.concurrency, args.floor_seconds, real_rate, args=extra
                )
                print(f"  {label + f', at {real_rate:.0f} calls/s':58} {server_ms:7.3f} {load_ms:8.3f} {rate:8.0f}")
        for loop, extra in (("asyncio", ()), ("uvloop", ("--event-loop", "uvloop"))):
            echo = floors["echo_server.py", extra][0]
            print(f"  the gateway's own work, saturated: {gateway_floor - echo:.3f} ms of CPU per call "
                  f"(fake-backend gateway minus the echo server on {loop})")
            if LOAD == "native":
                echo_at_rate = floors["echo_server.py", extra, "rate"][0]
                print(f"  the gateway's own work, real stack at c{args.concurrency}: {gateway_ms - echo_at_rate:.3f} ms of CPU per call "
                      f"(the gateway's {gateway_ms:.3f} minus the echo server's {echo_at_rate:.3f} on {loop} at the same {real_rate:.0f} calls/s)")


# The gateway floor with a kept change undone, or with a candidate on (bench/gateway_floor_server.py).
FLOOR_VARIANTS = [
    ("undone: lock-free metrics (prometheus_client's own)", ("--undo", "metrics")),
    ("undone: access log chain (TimeStamper, PrintLogger)", ("--undo", "access-log")),
    ("undone: request ids from uuid4", ("--undo", "request-id")),
    ("undone: stage timers as contextlib generators", ("--undo", "stages")),
    ("undone: method wrappers (the generic grpc.aio interceptor)", ("--undo", "interceptor")),
    ("undone: uvloop (asyncio's own event loop)", ("--event-loop", "asyncio")),
    ("undone: all six", ("--undo", "metrics", "--undo", "access-log", "--undo", "request-id", "--undo", "stages",
                         "--undo", "interceptor", "--event-loop", "asyncio")),
]


def floor_cpu(
    script: str, concurrency: int, seconds: float, rate: float | None = None, args: tuple[str, ...] = ()
) -> tuple[float, float, float]:
    """(server CPU ms per call, load generator CPU ms per call, calls/s) of bench/`script`
    under `concurrency` single-sentence callers (at most `rate` calls/s in all, native load
    only), measured over `seconds` after a warm-up."""
    with script_server(script, quiet=True, args=args) as (address, server):
        load = start_load(address, concurrency, seconds + 4, rate=rate)
        time.sleep(2)  # warm: the window starts once the load is steady
        server_before, load_before, start = cpu_seconds(server.pid), load.cpu(), time.monotonic()
        time.sleep(seconds)
        server_used, load_used = cpu_seconds(server.pid) - server_before, load.cpu() - load_before
        elapsed = time.monotonic() - start
        calls = calls_in_window(load, start, elapsed)
    return server_used * 1000 / calls, load_used * 1000 / calls, calls / elapsed


LOAD = "native"
# Warm-up of the native load before its measured window (whole seconds; the callers of this
# module sleep that long, or longer, before reading CPU).
NATIVE_WARM_UP = 2


class _Load:
    """A load process: h2load (native) or bench/embed_load.py; `pid`, `cpu()`, `calls(start, elapsed)`."""

    def __init__(self, address: str, concurrency: int, seconds: float, rate: float | None) -> None:
        self.native = LOAD == "native"
        if self.native:
            # h2load's window: from NATIVE_WARM_UP s after its start for `seconds` - warm-up;
            # one fixed sentence of the bench's kind (the fake backend and Triton treat all alike).
            request = embed_pb2.EmbedRequest(inputs=[sentences(1)[0]])
            clients = max(1, (concurrency + 15) // 16)
            self.run = native_load.start(
                address, "/ragserve.v1.Embed/Embed", request, concurrency=concurrency, connections=clients,
                seconds=seconds - NATIVE_WARM_UP, warm_up=NATIVE_WARM_UP, rps=None if rate is None else rate / clients,
            )
            self.pid = self.run.process.pid
        else:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "embed_load.py"), address, str(concurrency), str(seconds)],
                stdout=subprocess.PIPE, text=True,
            )
            self.pid = self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def calls(self, start: float, elapsed: float) -> int:
        if self.native:  # h2load's own count over its window, scaled to ours
            result = self.run.result()
            return round(result.rate * elapsed)
        finished, _ = self.process.communicate(timeout=60)
        return sum(1 for t in json.loads(finished) if start <= t <= start + elapsed)


def start_load(address: str, concurrency: int, seconds: float, rate: float | None = None) -> _Load:
    """Single-sentence callers against `address` for `seconds`, in a process of its own."""
    return _Load(address, concurrency, seconds, rate)


def calls_in_window(load: _Load, start: float, elapsed: float) -> int:
    """The calls the load process completed within [start, start + elapsed] (time.monotonic())."""
    return load.calls(start, elapsed)


if __name__ == "__main__":
    main()
