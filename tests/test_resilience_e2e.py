"""Triton going away and coming back, health, and draining on SIGTERM: real processes."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

import ragserve
from support import GatewayProcess, health_status, start_triton, wait_for_health, wait_until
from ragserve_server.supervision.triton_launcher import TritonServer

pytestmark = pytest.mark.integration

EMBED = "ragserve.v1.Embed"


@pytest.fixture
def own_stack(tmp_path):
    """A Triton and gateway of this test's own, so stopping Triton disturbs no other test."""
    triton = start_triton(tmp_path, ["minilm"])
    # A long drain: the SIGTERM test's big call must finish inside it even on a loaded machine.
    gateway = GatewayProcess(triton.grpc_url, triton.models, tmp_path / "gateway.log", "--drain-seconds", "60")
    try:
        gateway.wait_serving()
        yield triton, gateway
    finally:
        gateway.stop()
        triton.stop()


def test_triton_stopped_then_restarted(own_stack):
    triton, gateway = own_stack
    with ragserve.Client(gateway.address) as client:
        assert client.embed(["before"]).embeddings.shape == (1, 384)

        triton.stop()
        started = time.monotonic()
        with pytest.raises(ragserve.UnavailableError) as info:
            client.embed(["while down"], timeout=60)
        assert time.monotonic() - started < 30  # refused as unavailable, not left to its deadline
        assert "unavailable" in info.value.message
        wait_for_health(gateway.address, EMBED, serving=False, timeout=60)
        assert health_status(gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING

        # The same ports again: the gateway reconnects on its own.
        restarted = TritonServer(triton.model_repository, triton.models, triton.ports, triton.work_dir)
        restarted.start()
        try:
            restarted.wait_ready(120)
            wait_for_health(gateway.address, EMBED, serving=True, timeout=30)
            assert client.embed(["after"], timeout=30).embeddings.shape == (1, 384)
        finally:
            restarted.stop()


def minilm_successes(triton) -> int:
    import tritonclient.grpc as triton_grpc

    stats = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics("minilm", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"].get("success", {}).get("count", 0))


def test_sigterm_drains_in_flight_calls(own_stack):
    triton, gateway = own_stack
    texts = [f"a long-ish passage number {i} " * 6 for i in range(300)]
    outcome: dict = {}
    client = ragserve.Client(gateway.address, retries=0)  # the in-flight call itself must complete
    client.embed(["connect first"], timeout=30)  # so the big call is on the wire at once

    def call() -> None:
        try:
            outcome["result"] = client.embed(texts, timeout=120)
        except ragserve.RagserveError as exc:
            outcome["error"] = exc

    before = minilm_successes(triton)
    worker = threading.Thread(target=call)
    worker.start()
    # Proof the call is in flight: Triton has answered part of it (300 rows go as several
    # requests) while the call has not returned.
    wait_until(lambda: minilm_successes(triton) > before or not worker.is_alive(), 120, "the call reaching Triton")
    in_flight = worker.is_alive() and not outcome
    gateway.process.send_signal(signal.SIGTERM)
    worker.join(120)
    assert in_flight, "the call ended before SIGTERM: draining was not exercised"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].embeddings.shape == (300, 384)
    assert gateway.process.wait(30) == 0
    client.close()
    with pytest.raises(ragserve.UnavailableError):
        with ragserve.Client(gateway.address) as client:
            client.embed(["after shutdown"], timeout=2)


def test_health_and_reflection(gateway):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for service in ("", EMBED, "ragserve.v1.Models"):
        assert health_status(gateway.address, service) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in reply.list_services_response.service}
    assert {"ragserve.v1.Embed", "ragserve.v1.Rerank", "ragserve.v1.Generate", "ragserve.v1.Models", "grpc.health.v1.Health"} <= names


# A caller in a process of its own, with a receive window larger than the answer (so the gateway
# hands all of it to the kernel at once) and BDP probing off (the window stays as set).
_SLOW_READER = """
import sys, ragserve
texts = [f"a long-ish passage number {i} " * 6 for i in range(300)]
options = [("grpc.http2.lookahead_bytes", 4 << 20), ("grpc.http2.bdp_probe", 0)]
with ragserve.Client(sys.argv[1], retries=0, options=options) as client:
    client.embed(["connect first"], timeout=60)
    print("connected", flush=True)
    try:
        print("shape", client.embed(texts, timeout=120).embeddings.shape, flush=True)
    except ragserve.RagserveError as exc:
        print("error", repr(exc), flush=True)
"""


def test_sigterm_drain_waits_until_a_slow_caller_has_its_answer(own_stack, tmp_path):
    """The flake seen in CI (`recvmsg: Connection reset by peer` on SIGTERM on a loaded machine):
    gRPC closes a connection as soon as its last answer is in the kernel, and a caller still
    reading then gets a RST that drops the rest. Here the caller is stopped (SIGSTOP: a process
    starved of CPU) while its call is answered; the draining gateway must wait for it to take
    the answer before GOAWAY (supervision/drain.py) instead of closing and exiting."""
    import subprocess
    import sys

    triton, gateway = own_stack
    out = tmp_path / "caller.out"
    with open(out, "w") as sink:
        caller = subprocess.Popen([sys.executable, "-c", _SLOW_READER, gateway.address], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "connected" in out.read_text(), 60, "the caller connecting")
        before = minilm_successes(triton)
        wait_until(lambda: minilm_successes(triton) > before, 120, "the big call reaching Triton")
        gateway.process.send_signal(signal.SIGTERM)
        wait_until(lambda: any(e.get("event") == "draining" for e in gateway.log_events()), 60, "the gateway draining")
        caller.send_signal(signal.SIGSTOP)  # the caller takes nothing more from its socket
        # The call is answered while the caller is stopped ...
        wait_until(
            lambda: any(e.get("event") == "rpc" and e.get("method") == "Embed" and e.get("status") == "OK" and e.get("prompt_tokens", 0) > 1000
                        for e in gateway.log_events()),
            120, "the big call's answer",
        )
        # ... and the gateway waits for its delivery instead of closing the connection and exiting.
        wait_until(
            lambda: gateway.process.poll() is not None or any(e.get("event") == "drain_waiting_for_delivery" for e in gateway.log_events()),
            60, "the gateway waiting for the answer's delivery (or exiting)",
        )
        exited_early = gateway.process.poll() is not None
        caller.send_signal(signal.SIGCONT)
        assert caller.wait(120) == 0
        assert not exited_early, f"the gateway exited with the answer undelivered; the caller got: {out.read_text()}"
        assert "shape (300, 384)" in out.read_text(), out.read_text()
        assert gateway.process.wait(60) == 0
    finally:
        caller.send_signal(signal.SIGCONT)
        if caller.poll() is None:
            caller.kill()
            caller.wait()
