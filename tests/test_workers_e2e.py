"""--workers: several gateway processes on one port, against the session's real Triton."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest

from ragserve.v1 import embed_pb2, embed_pb2_grpc
from support import GatewayProcess, free_port
from test_scaleout_e2e import gateway_samples

pytestmark = pytest.mark.integration


def started_workers(log_path) -> dict[int, int]:
    """{worker index: pid} from worker 0's log, the latest start of each."""
    pids = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"worker_started"' in line:
            entry = json.loads(line)
            pids[entry["child"]] = entry["pid"]
    return pids


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def embed_over_new_connections(address: str, count: int) -> None:
    """`count` calls, each on its own channel and TCP connection (the kernel spreads connections)."""
    for i in range(count):
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = embed_pb2_grpc.EmbedStub(channel).Embed(embed_pb2.EmbedRequest(inputs=[f"worker spread check {i}"]), timeout=60)
            assert len(reply.embeddings) == 1 and len(reply.embeddings[0].values) == 384


def embed_calls_served(metrics_url: str) -> float:
    samples = gateway_samples(metrics_url, "ragserve_requests_total")
    return sum(v for labels, v in samples.items() if 'service="Embed"' in labels and 'code="OK"' in labels)


def test_workers_share_the_port_restart_a_dead_one_and_stop_together(triton, tmp_path):
    metrics = free_port()
    log_path = tmp_path / "gateway.log"
    gateway = GatewayProcess(triton.grpc_url, triton.models, log_path, "--workers", "2", metrics_port=metrics)
    urls = [f"http://127.0.0.1:{metrics + i}/metrics" for i in range(2)]
    try:
        gateway.wait_serving()
        wait_until(lambda: answers(urls[1]), 90, "worker 1's metrics (it starts once worker 0 serves)")
        first = started_workers(log_path)[1]

        # 40 connections: both workers get some (all on one: probability 2^-39).
        embed_over_new_connections(gateway.address, 40)
        served = [embed_calls_served(url) for url in urls]
        assert sum(served) == 40 and min(served) > 0, served

        # A dead worker is restarted on the same port; calls on new connections keep working.
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: started_workers(log_path)[1] != first and started_workers(log_path)[1], 30, "worker 1's restart")
        wait_until(lambda: answers(urls[1]), 90, "the restarted worker's metrics")
        embed_over_new_connections(gateway.address, 10)
        assert "worker_exited" in log_path.read_text()

        # SIGTERM to worker 0 stops its workers too.
        assert gateway.stop() == 0
        wait_until(lambda: not alive(second), 15, "worker 1 to stop with worker 0")
    finally:
        gateway.stop()


def test_the_sdk_spreads_one_clients_calls_over_the_workers(triton, tmp_path):
    """`connections=N`: one client, N TCP connections, calls in turn: every worker serves some."""
    import ragserve

    metrics = free_port()
    gateway = GatewayProcess(triton.grpc_url, triton.models, tmp_path / "gateway.log", "--workers", "2", metrics_port=metrics)
    urls = [f"http://127.0.0.1:{metrics + i}/metrics" for i in range(2)]
    try:
        gateway.wait_serving()
        wait_until(lambda: answers(urls[1]), 90, "worker 1's metrics")
        with ragserve.Client(gateway.address, connections=16, timeout=60) as client:
            for i in range(32):
                assert client.embed([f"sdk spread {i}"]).embeddings.shape == (1, 384)
        served = [embed_calls_served(url) for url in urls]
        assert sum(served) == 32 and min(served) > 0, served  # 16 connections all on one worker: 2^-15
    finally:
        gateway.stop()
    with pytest.raises(ValueError, match="connections must be 1 or more"):
        ragserve.Client(gateway.address, connections=0)


def test_workers_stop_when_worker_0_is_killed(triton, tmp_path):
    log_path = tmp_path / "gateway.log"
    gateway = GatewayProcess(triton.grpc_url, triton.models, log_path, "--workers", "2", "--drain-seconds", "1")
    try:
        gateway.wait_serving()
        worker = wait_until(lambda: started_workers(log_path).get(1), 60, "worker 1 to start")
        wait_until(lambda: "ragserve listening" in log_path.read_text().split('"worker_started"', 1)[-1], 90, "worker 1 to serve")
        gateway.process.kill()  # SIGKILL: worker 0 cannot stop anything itself
        gateway.process.wait(10)
        wait_until(lambda: not alive(worker), 20, "worker 1 to stop after worker 0 died")
    finally:
        gateway.stop()
