"""Starting real processes for tests and benchmarks: bundled Triton, gateway, health waits."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragserve_server.models.registry import TEMPLATES

from ragserve_server.models.builtin import builtin_specs, minilm_spec
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before in this test run. The kernel can
    give the same port to two binds in a row once the first socket is closed, and callers take
    several ports before binding any (a clean-clone CI run started a Triton whose HTTP and
    metrics ports were the same, and it refused to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def start_triton(work_dir: Path, models: list[str], repository: Path = MODEL_REPOSITORY) -> TritonServer:
    missing = [line for spec in builtin_specs(repository, models) for line in spec.missing_artifacts(repository)]
    if missing:
        raise RuntimeError("models not built:\n" + "\n".join(missing))
    server = TritonServer(repository, models, TritonPorts(free_port(), free_port(), free_port()), work_dir)
    server.start()
    try:
        server.wait_ready(180)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def gateway_over(triton: TritonServer, models: list[str], work_dir: Path) -> Iterator["GatewayProcess"]:
    """A gateway serving `models` of a started Triton; on exit it stops the gateway, then the Triton."""
    try:
        gateway = GatewayProcess(triton.grpc_url, models, work_dir / "gateway.log").wait_serving(timeout=120)
        try:
            yield gateway
        finally:
            gateway.stop()
    finally:
        triton.stop()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str, allow_module_level: bool = False):
    """A missing artifact or package: a skip on a developer's machine, a failure in CI
    (`CI=true`), where everything the suite needs is built."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing artifact or package fails the run)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def import_or_unavailable(name: str, allow_module_level: bool = False):
    """`pytest.importorskip`, failing in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"cannot import {name}: {exc}", allow_module_level)


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition", interval: float = 0.05):
    """Polls `predicate` until it returns something truthy (returned); TimeoutError naming `what`
    after `timeout` s. Tests wait on the condition itself, never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(interval)


def counted(read, target: int, what: str, timeout: float = 30.0) -> int:
    """`read()` once it reaches `target`. Triton counts a request in its statistics when it
    releases the request, which can be just after the answer reached the caller, so a count read
    right after the last answer can be short by the last requests (a clean-clone CI run saw it)."""
    wait_until(lambda: read() >= target, timeout, what)
    return read()


async def eventually(predicate, timeout: float = 30.0, what: str = "the condition", interval: float = 0.005):
    """`wait_until` for in-process asyncio tests: yields to the event loop between polls."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(interval)


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` at a Prometheus endpoint whose labels include `labels`
    (0 when none)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def health_status(address: str, service: str = "", timeout: float = 2.0) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return reply.status
        except grpc.RpcError:
            return None


def wait_for_health(address: str, service: str = "", serving: bool = True, timeout: float = 60.0) -> None:
    want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(address, service) == want:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{address} health for {service!r} is not {'SERVING' if serving else 'NOT_SERVING'} after {timeout}s")


class GatewayProcess:
    """`python -m ragserve_server` against an external Triton, on a free loopback port."""

    def __init__(
        self, triton_url: str, triton_models: list[str], log_path: Path, *extra_args: str, metrics_port: int = 0
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = metrics_port  # 0: no metrics endpoint
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log_path
        args = [
            sys.executable, "-m", "ragserve_server",
            "--port", str(self.port),
            "--metrics-port", str(metrics_port),
            "--triton-url", triton_url,
            "--triton-models", ",".join(triton_models),
            "--health-poll-interval", "0.2",
            "--log-format", "json",
            *extra_args,
        ]
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def wait_serving(self, timeout: float = 60.0) -> "GatewayProcess":
        """Waits for health SERVING; on failure stops the process and raises with its log."""
        try:
            wait_for_health(self.address, timeout=timeout)
        except BaseException as exc:
            self.stop()
            raise RuntimeError(f"gateway not serving; the end of {self.log_path}:\n{self.log_tail()}") from exc
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def log_events(self) -> list[dict]:
        """The JSON lines of its log so far (`--log-format json`), other lines skipped."""
        import json

        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return events

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return children + [d for c in children for d in descendants(c)]


def python_backend_stubs(triton_pid: int) -> list[int]:
    """The python-backend stub processes (one per model instance) of a running Triton."""
    return [pid for pid in descendants(triton_pid) if Path(f"/proc/{pid}/comm").read_text().startswith("triton_python")]


# --- Triton's python backend, stood in for: a model template runs in-process ---


class BackendTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array

    def to_dlpack(self):
        return self.array.__dlpack__()  # a DLPack capsule, as the real one returns

    def __dlpack__(self, stream=None, **_):  # the real one is a DLPack producer too (np.from_dlpack)
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name, source):
        """`source`: an object with __dlpack__ (a numpy array) or a DLPack capsule (torch's to_dlpack)."""
        if hasattr(source, "__dlpack__"):
            return cls(name, np.from_dlpack(source))
        import torch

        return cls(name, torch.utils.dlpack.from_dlpack(source).numpy())


class BackendRequest:
    def __init__(self, **tensors):
        self.tensors = {name: BackendTensor(name, array) for name, array in tensors.items()}


def python_backend_utils() -> types.ModuleType:
    """What the templates use of `triton_python_backend_utils`; a response is its tensor list."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = BackendTensor
    module.TritonModelException = type("TritonModelException", (Exception,), {})
    module.InferenceResponse = lambda output_tensors: output_tensors
    module.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    return module


def load_template(monkeypatch, filename: str) -> types.ModuleType:
    """scripts/templates/`filename` imported beside the stand-in for the python backend."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", python_backend_utils())
    spec = importlib.util.spec_from_file_location(Path(filename).stem, TEMPLATES / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_tokens(texts: list[str], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of MiniLM, right-padded to `width` (default: the longest)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_spec().tokenizer_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return pad_rows(tokenizer.encode_batch(texts), width)


def pad_rows(encodings, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of unpadded `tokenizers` encodings, right-padded to `width`
    (default: the longest)."""
    width = width or max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), np.int64)
    mask = np.zeros((len(encodings), width), np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return ids, mask
