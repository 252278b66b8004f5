"""The gateway looks after the Triton it launched: SIGKILL, a stuck Triton, attempts exhausted.

Each test runs `python -m ragserve_server` with the bundled Triton (no --triton-url) on free
loopback ports, and finds Triton's pid in the gateway's JSON log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

import ragserve
from support import free_port, health_status, python_backend_stubs, wait_for_health, wait_until

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BundledStack:
    def __init__(self, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        args = [
            sys.executable, "-m", "ragserve_server",
            "--port", str(self.port), "--metrics-port", "0",
            "--triton-models", "minilm",
            "--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
            "--triton-metrics-port", str(free_port()),
            "--health-poll-interval", "0.2", "--log-format", "json",
            "--triton-restart-backoff", "0.2",
            *extra,
        ]
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_health(self.address, timeout=120)
        except BaseException:
            self.stop()
            raise RuntimeError(f"gateway not serving:\n{self.log_tail()}")

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def triton_pid(self) -> int:
        return self.events("triton_started")[-1]["pid"]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def alive(pid: int) -> bool:
    """Exists and is not a zombie (an ended orphan waits for its reaper as one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def seconds_until(address: str, status: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if health_status(address, timeout=0.5) == status:
            return time.monotonic() - start
        time.sleep(0.02)
    raise TimeoutError(f"health never became {status} in {timeout}s")


def test_sigkilled_triton_is_restarted_and_calls_never_hang(tmp_path, capsys):
    stack = BundledStack(tmp_path / "gateway.log")
    try:
        outcomes: list[tuple[str, float]] = []
        stop = threading.Event()

        def load() -> None:
            with ragserve.Client(stack.address) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        client.embed(["a query while Triton dies"], timeout=3)
                        outcomes.append(("OK", time.monotonic() - started))
                    except ragserve.RagserveError as exc:
                        outcomes.append((type(exc).__name__, time.monotonic() - started))
                        time.sleep(0.05)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: any(kind == "OK" for kind, _ in outcomes), 60, "the load's first answer")
        stubs = python_backend_stubs(stack.triton_pid())
        assert stubs, "no python-backend stub found under Triton"
        os.kill(stack.triton_pid(), signal.SIGKILL)
        to_not_serving = seconds_until(stack.address, NOT_SERVING, 30)
        to_serving = seconds_until(stack.address, SERVING, 120) + to_not_serving
        answered = len(outcomes)
        wait_until(lambda: any(kind == "OK" for kind, _ in outcomes[answered:]), 60, "an answer after the restart")
        stop.set()
        for thread in threads:
            thread.join(30)
        with capsys.disabled():
            print(f"\n[supervision] SIGKILL -> NOT_SERVING {to_not_serving:.2f}s, serving again after {to_serving:.1f}s")
        # Health polls every 0.2 s: seconds, not the restart's tens (generous for a loaded machine).
        assert to_not_serving < 5.0
        kinds = {kind for kind, _ in outcomes}
        assert kinds <= {"OK", "UnavailableError"}, kinds
        # None hung past its 3 s deadline (DeadlineExceeded would show in `kinds`; this bounds
        # the client side, with room for a loaded machine).
        assert max(seconds for _, seconds in outcomes) < 10
        assert outcomes[-1][0] == "OK"  # serving again by itself
        down = stack.events("triton_down")
        assert len(down) == 1 and "exited with code -9" in down[0]["reason"]
        assert stack.events("triton_restarted")
        # The killed Triton's stubs were ended too, not left holding the model's memory.
        assert [pid for pid in stubs if alive(pid)] == []
        assert stack.events("triton_orphans_ended")
    finally:
        assert stack.stop() == 0


def test_a_stuck_triton_is_killed_and_restarted(tmp_path):
    stack = BundledStack(tmp_path / "gateway.log", "--triton-stuck-seconds", "2")
    try:
        pid = stack.triton_pid()
        os.kill(pid, signal.SIGSTOP)  # alive, answers nothing
        seconds_until(stack.address, NOT_SERVING, 60)
        seconds_until(stack.address, SERVING, 120)
        assert "stuck" in stack.events("triton_down")[0]["reason"]
        assert stack.triton_pid() != pid
        with ragserve.Client(stack.address, timeout=60) as client:
            assert client.embed(["after the restart"]).embeddings.shape == (1, 384)
        # SIGTERM to the gateway leaves no Triton and no python-backend stub behind.
        triton = stack.triton_pid()
        stubs = python_backend_stubs(triton)
        assert stubs, "no python-backend stub found under Triton"
    finally:
        code = stack.stop()
    assert code == 0
    assert [pid for pid in [triton, *stubs] if alive(pid)] == []


def test_the_gateway_exits_non_zero_when_restarts_run_out_and_the_backoff_doubles(tmp_path):
    stack = BundledStack(tmp_path / "gateway.log", "--triton-restart-attempts", "2")
    os.kill(stack.triton_pid(), signal.SIGKILL)
    wait_until(lambda: len(stack.events("triton_restarted")) == 1, 120, "the first restart")
    os.kill(stack.triton_pid(), signal.SIGKILL)  # again, within the stable period: the next attempt
    wait_until(lambda: len(stack.events("triton_restarted")) == 2, 120, "the second restart")
    os.kill(stack.triton_pid(), signal.SIGKILL)  # a third time: out of attempts
    code = stack.process.wait(120)
    stack.stop()
    assert code != 0
    # --triton-restart-backoff 0.2, doubled per restart in a row.
    assert [e["in_seconds"] for e in stack.events("triton_restarting")] == [0.2, 0.4]
    assert stack.events("triton_gave_up")
    assert "restarts in a row did not bring it back" in stack.log_tail()
