"""Starts the Triton Inference Server binary bundled in the `nvidia-pytriton` wheel.

What it takes on a machine without a GPU (see DESIGN.md): the wheel's libraries on
LD_LIBRARY_PATH, a writable backend folder holding the python backend plus the
`triton_python_backend_stub` for this Python version, and the virtualenv's `bin/` first
on PATH so that the stub finds the project's packages.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0])


def prepare_backend_dir(target: Path) -> Path:
    """A backend folder with the python backend and this Python's stub (built once)."""
    triton_dir = _pytriton_dir() / "tritonserver"
    python_backend = target / "python"
    stub = python_backend / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copytree(triton_dir / "backends" / "python", python_backend, dirs_exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(triton_dir / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    return target


def trace_flags(url: str, rate: int = 1) -> list[str]:
    """Triton's OpenTelemetry mode (2.51): it exports OTLP/HTTP (JSON) to `url`
    (`host:port/v1/traces`) and continues the `traceparent` of each gRPC request, so its spans
    (the request, the model with QUEUE_START, `compute`) join the gateway's trace. `rate`:
    one request in `rate` is traced (Triton samples by itself, not by the caller's flag)."""
    url = url.removeprefix("http://")
    return [
        "--trace-config=mode=opentelemetry",
        "--trace-config=level=TIMESTAMPS",
        f"--trace-config=rate={rate}",
        "--trace-config=count=-1",
        f"--trace-config=opentelemetry,url={url}",
        "--trace-config=opentelemetry,resource=service.name=triton",
        "--trace-config=opentelemetry,bsp_schedule_delay=500",
    ]


# Triton's APIs the gateway never calls: loading and unloading models, registering shared
# memory, changing trace and log settings. With an admin key they answer only a request that
# carries the header `ragserve-admin-key: <key>` (Triton's --grpc-restricted-protocol /
# --http-restricted-api): other local processes cannot load or unload models on the loopback ports.
ADMIN_HEADER = "ragserve-admin-key"
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # Triton's gRPC front expects the key so prefixed
ADMIN_APIS = ("model-repository", "shared-memory", "trace", "logging")


def restricted_api_flags(admin_key: str) -> list[str]:
    rule = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={admin_key}"
    return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


class TritonServer:
    """A bundled Triton process on loopback: `start()`, `wait_ready()`, `stop()`."""

    def __init__(
        self, model_repository: Path, models: list[str], ports: TritonPorts, work_dir: Path, trace_url: str = "", trace_rate: int = 1,
        admin_key: str | None = None,
    ) -> None:
        self.model_repository = Path(model_repository)
        self.admin_key = admin_key  # restricts ADMIN_APIS to callers sending it (None: open, as tests use)
        self.trace_url = trace_url  # OTLP/HTTP endpoint for Triton's own spans; empty = no tracing
        self.trace_rate = trace_rate
        self.models = models
        self.ports = ports
        self.work_dir = Path(work_dir)
        self.process: subprocess.Popen | None = None
        self.log_path = self.work_dir / f"triton-{ports.grpc}.log"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        backends = prepare_backend_dir(self.work_dir / "triton_backends")
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1",
            f"--grpc-port={self.ports.grpc}",
            f"--http-port={self.ports.http}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--metrics-port={self.ports.metrics}",
            "--metrics-address=127.0.0.1",
            "--log-verbose=0",
            # Bounded shutdown: Triton exits after this even if a model does not unload in
            # time (seen with the generation model after some cancelled streams).
            "--exit-timeout-secs=10",
        ]
        cmd += [f"--load-model={m}" for m in self.models]
        if self.trace_url:
            cmd += trace_flags(self.trace_url, self.trace_rate)
        if self.admin_key:
            cmd += restricted_api_flags(self.admin_key)
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
        # This interpreter's own libpython first: the stub links libpython3.X dynamically, and
        # a system copy of another patch release breaks extension modules (_ssl) under pyenv.
        own = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (own, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join((venv_bin, env.get("PATH", "")))
        return env

    def start(self) -> None:
        self.end_orphans()  # of the Triton this one replaces, if it died: the new stubs need that memory
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log.info("triton_starting", models=self.models, grpc_port=self.ports.grpc, log=str(self.log_path))
        with open(self.log_path, "ab") as out:
            # Own process group: a Ctrl-C meant for the gateway does not kill Triton mid-drain.
            self.process = subprocess.Popen(
                self.command(), env=self.environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("triton_started", pid=self.process.pid)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}/v2/health/ready", timeout=1) as r:
                if r.status != 200:
                    return False
            for model in self.models:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}/v2/models/{model}/ready", timeout=1) as r:
                    if r.status != 200:
                        return False
            return True
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Triton exited with {self.process.returncode}; see {self.log_path}:\n{self.log_tail()}")
            if self.is_ready():
                log.info("triton_ready", grpc=self.grpc_url, metrics=self.metrics_url)
                return
            time.sleep(0.25)
        raise TimeoutError(f"Triton not ready after {timeout:.0f}s; see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            log.info("triton_stopped", code=self.process.returncode)
        self.end_orphans()

    def end_orphans(self) -> None:
        """Ends what a Triton that exited left behind. A SIGKILLed tritonserver cannot end its
        python-backend stubs (one per model instance); they live on, orphaned, ignore SIGTERM,
        and each keeps its model's memory. They are in Triton's process group (its own, see
        start), so after Triton has exited, SIGKILL to the group ends exactly them."""
        if self.process is None or self.process.poll() is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # the group is empty: Triton ended its stubs itself
        log.warning("triton_orphans_ended", process_group=self.process.pid)


@dataclass(frozen=True)
class RestartPolicy:
    attempts: int = 5  # restarts in a row before the gateway gives up and exits
    backoff: float = 1.0  # seconds before the first restart, doubled each time, capped below
    max_backoff: float = 30.0
    stuck_seconds: float = 30.0  # alive but not ready for this long = treated as dead
    stable_seconds: float = 60.0  # ready this long after a restart: the count starts again
    check_interval: float = 0.25


class TritonSupervisor:
    """Watches the bundled Triton: restarts it with backoff when it dies or is stuck.

    `on_change()` runs at once when Triton goes down and again when it is ready, so health
    follows within the check interval instead of the next poll. When `policy.attempts`
    restarts in a row fail to bring back a Triton that stays up, `run()` returns a reason and
    the gateway exits non-zero, so that its own supervisor (systemd, Kubernetes) takes over.
    """

    def __init__(self, triton: TritonServer, policy: RestartPolicy, ready_timeout: float,
                 on_change: Callable[[], Awaitable[None]]) -> None:
        self.triton = triton
        self.policy = policy
        self.ready_timeout = ready_timeout
        self.on_change = on_change
        self.restarts = 0  # restarts in a row (reset once Triton stays up `stable_seconds`)

    async def run(self) -> str:
        """Supervises until cancelled; returns why it gave up when attempts are exhausted."""
        up_since = time.monotonic()
        not_ready_since: float | None = None
        while True:
            await asyncio.sleep(self.policy.check_interval)
            process = self.triton.process
            reason = None
            if process is None or process.poll() is not None:
                reason = f"exited with code {None if process is None else process.returncode}"
            else:
                ready = await asyncio.to_thread(self.triton.is_ready)
                now = time.monotonic()
                if ready:
                    not_ready_since = None
                    if self.restarts and now - up_since >= self.policy.stable_seconds:
                        self.restarts = 0
                    continue
                not_ready_since = not_ready_since or now
                if now - not_ready_since < self.policy.stuck_seconds:
                    continue
                reason = f"alive but not ready for {now - not_ready_since:.0f}s (stuck)"
                process.kill()
                await asyncio.to_thread(process.wait)
            not_ready_since = None
            log.error("triton_down", reason=reason, pid=process.pid if process else None, log_tail=self.triton.log_tail(15))
            await self.on_change()
            restored = await self._restart(reason)
            if restored is not None:
                return restored
            up_since = time.monotonic()
            await self.on_change()

    async def _restart(self, reason: str) -> str | None:
        """Restarts until ready or out of attempts; returns the reason to give up, or None."""
        while True:
            if self.restarts >= self.policy.attempts:
                return f"Triton {reason}; {self.restarts} restarts in a row did not bring it back (see {self.triton.log_path})"
            delay = min(self.policy.backoff * 2 ** self.restarts, self.policy.max_backoff)
            self.restarts += 1
            log.warning("triton_restarting", attempt=self.restarts, of=self.policy.attempts, in_seconds=delay)
            await asyncio.sleep(delay)
            try:
                self.triton.start()
                await asyncio.to_thread(self.triton.wait_ready, self.ready_timeout)
                log.info("triton_restarted", attempt=self.restarts, pid=self.triton.process.pid)
                return None
            except (RuntimeError, TimeoutError) as exc:
                reason = str(exc).splitlines()[0]
                log.error("triton_restart_failed", attempt=self.restarts, error=reason, log_tail=self.triton.log_tail(15))
                if self.triton.process is not None and self.triton.process.poll() is None:
                    self.triton.process.kill()
                    await asyncio.to_thread(self.triton.process.wait)
