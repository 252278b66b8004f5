"""`--workers N`: N gateway processes serving one port, so the gateway is not capped by one core.

Why: a gateway process runs its event loop, gRPC's Python layer and the tokenizer on one core.
On a GPU machine that core, not the model, sets the pace: on an H200 one gateway served about
1,500 single-sentence Embed calls/s while the model alone did 9,500 rows/s, and four gateway
processes served 3,400 (bench/gpu_check.py --gateways 1,4).

How: the process started by the user is worker 0. It launches the bundled Triton (or uses
--triton-url), binds the port, then starts workers 1..N-1 as its children: the same command
line with --triton-url pointing at that Triton, the port worker 0 bound (so --port 0 works),
--worker-index i and --workers 1-style defaults for what must not repeat. Every worker binds
the gRPC port (and the HTTP port) with SO_REUSEPORT, so the kernel spreads new connections over
them; a connection stays with the worker that accepted it (use several channels, or several
clients, to spread one client's calls). Each worker serves its own metrics on --metrics-port + i
and takes 1/N of the admission budgets. Worker 0 restarts a child that exits (backoff doubling
to 30 s) and, when it stops, stops its children first (SIGTERM: they drain), then itself;
workers get SIGTERM if worker 0 dies (PR_SET_PDEATHSIG, set by each worker at start).
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import signal
import sys
import time

import structlog

log = structlog.get_logger("ragserve.workers")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def share(total: int, workers: int) -> int:
    """One worker's part of an admission budget (at least 1)."""
    return max(1, math.ceil(total / workers))


# Cores a bundled Triton driving a GPU keeps for itself (its gRPC front, the python backend's
# stubs, the CUDA launch threads); the model's work is on the GPU.
GPU_TRITON_CORES = 2


def auto_count(device: str, bundled_triton: bool, cores: int | None = None) -> int:
    """`--workers 0` (auto): one gateway per core the model does not need. On a CPU the model
    is computed on the same cores (more gateways would take them from it): one. With --device gpu:
    every core but the bundled Triton's, or every core when Triton is elsewhere (--triton-url)."""
    if device != "gpu":
        return 1
    cores = cores if cores is not None else usable_cores()
    return max(1, cores - (GPU_TRITON_CORES if bundled_triton else 0))


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (a
    Kubernetes CPU limit leaves the affinity at every core of the node)."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(cgroup: str) -> float | None:
    """CPUs of the cgroup's quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None: no limit."""
    try:
        with open(os.path.join(cgroup, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(cgroup, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(cgroup, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def metrics_port(base: int, index: int) -> int:
    return base + index if base else 0


def child_argv(argv: list[str], index: int, *, workers: int, port: int, http_port: int, triton_url: str) -> list[str]:
    """Worker `index`'s command line: the parent's, then overrides (argparse keeps the last).
    It has the parent's count of workers (N, also when --workers 0 counted them: with
    --triton-url a child would count otherwise): each worker takes its 1/N of the budgets,
    and only worker 0 has children."""
    return [
        sys.executable, "-m", "ragserve_server", *argv,
        "--workers", str(workers),
        "--worker-index", str(index),
        "--port", str(port),
        "--http-port", str(http_port),
        "--triton-url", triton_url,  # worker 0's bundled Triton (plaintext, loopback) or the parent's own --triton-url
    ]


def die_with_parent() -> None:
    """Called first in workers 1..N-1: SIGTERM when worker 0 dies, however it dies. (Set here,
    not in a preexec_fn: forking a threaded process and running Python before exec can deadlock.)"""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: worker 0 still stops its workers when it stops
        return
    if parent == 1:  # worker 0 died before the line above
        raise SystemExit("ragserve: worker 0 is gone; this worker stops")


class WorkerPool:
    """Worker 0's children: started, restarted when they exit, stopped with worker 0."""

    def __init__(self, commands: dict[int, list[str]], stop_grace: float) -> None:
        self.commands = commands
        self.stop_grace = stop_grace
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    async def run(self) -> None:
        """Supervises every child until cancelled; never returns on its own."""
        await asyncio.gather(*(self._keep(index) for index in self.commands))

    async def _keep(self, index: int) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                # Its own session: a Ctrl-C in the terminal reaches worker 0 only, which stops the
                # workers itself (a worker that stopped on its own would be restarted).
                process = await asyncio.create_subprocess_exec(*self.commands[index], start_new_session=True)
            except OSError as exc:
                log.error("worker_not_started", child=index, error=str(exc), retry_in_s=backoff)
            else:
                self.processes[index] = process
                log.info("worker_started", child=index, pid=process.pid)
                code = await process.wait()
                if self._stopping:
                    return
                if time.monotonic() - started > 60:
                    backoff = 1.0  # it ran a while: a fresh failure, not a crash loop
                log.error("worker_exited", child=index, pid=process.pid, code=code, restart_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        """SIGTERM to every child (each drains its calls), SIGKILL to any still there after the grace."""
        self._stopping = True
        running = [p for p in self.processes.values() if p.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), self.stop_grace + 5)
        except asyncio.TimeoutError:
            for process in running:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in running))
        log.info("workers_stopped", workers=len(running))
