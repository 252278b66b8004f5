"""Replicas that come and go through DNS, against real processes: a DNS server on loopback
(dnslib) whose A records for `triton.test` the test changes, two bundled Tritons on
127.0.0.2 and 127.0.0.3 with the same gRPC port (Linux routes all of 127/8 to lo), and a
gateway started with `--triton-url dns://127.0.0.1:<dns port>/triton.test:<port>`.

What each step checks, in the gateway's per-replica metrics and in each Triton's own
statistics: only the resolved replica takes calls; a replica added to the answer is taken in
and calls land on both; a replica dropped from the answer is taken out (then stopped) while a
steady load sees no failed call; SERVFAIL and a stopped DNS server keep the last set.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.request

import pytest
import tritonclient.grpc as triton_grpc

import ragserve
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer
from dns_server import ChangingDns
from support import MODEL_REPOSITORY, GatewayProcess, counted, free_port, wait_until

pytestmark = pytest.mark.integration

NAME = "triton.test"
IPS = ("127.0.0.2", "127.0.0.3")


class LoopbackTriton(TritonServer):
    """The bundled Triton with its gRPC port on another loopback address (HTTP and metrics
    stay on 127.0.0.1 at their own ports, for the readiness checks)."""

    def __init__(self, ip: str, grpc_port: int, work_dir) -> None:
        super().__init__(MODEL_REPOSITORY, ["minilm"], TritonPorts(free_port(), grpc_port, free_port()), work_dir)
        self.ip = ip

    @property
    def grpc_url(self) -> str:
        return f"{self.ip}:{self.ports.grpc}"

    def command(self) -> list[str]:
        return [f"--grpc-address={self.ip}" if a == "--grpc-address=127.0.0.1" else a for a in super().command()]


def port_free_on_both() -> int:
    for _ in range(50):
        with socket.socket() as first:
            first.bind((IPS[0], 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind((IPS[1], port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no TCP port free on both {IPS}")


def gateway_samples(url: str, name: str) -> dict[str, float]:
    """{labels text: value} of one metric in a gateway scrape."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.M)}


def inferences(triton: TritonServer) -> int:
    """Requests that Triton replica executed for minilm (its own statistics)."""
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    stats = client.get_inference_statistics("minilm", as_json=True)
    return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats.get("model_stats", []))


class Load:
    """Embed calls of 16 texts from `threads` threads until stopped, so that some call is in
    flight on each replica at any moment; every failure is kept (the SDK's retries are off)."""

    def __init__(self, address: str, threads: int = 4) -> None:
        self.address = address
        self.done = 0
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, worker: int) -> None:
        with ragserve.Client(self.address, timeout=30, retries=0) as client:
            while not self._stop.is_set():
                try:
                    client.embed([f"steady load {worker} {self.done} sentence {i} " * 8 for i in range(16)])
                    with self._lock:
                        self.done += 1
                except ragserve.RagserveError as exc:
                    self.errors.append(exc)

    def at_least(self, more: int, what: str) -> None:
        target = self.done + more
        wait_until(lambda: self.done >= target or self.errors, 120, what)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


@pytest.fixture
def cluster(tmp_path):
    dns = ChangingDns(NAME, [IPS[0]])
    port = port_free_on_both()
    tritons = [LoopbackTriton(ip, port, tmp_path / f"triton-{ip}") for ip in IPS]
    gateway = None
    try:
        for triton in tritons:  # both start side by side
            triton.start()
        for triton in tritons:
            triton.wait_ready(180)
        gateway = GatewayProcess(
            f"dns://{dns.authority}/{NAME}:{port}", ["minilm"], tmp_path / "gateway.log", metrics_port=free_port()
        ).wait_serving(timeout=120)
        yield dns, tritons, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        for triton in tritons:
            triton.stop()
        dns.stop()


def test_replicas_follow_the_dns_answer(cluster):
    dns, tritons, gateway = cluster
    url = {ip: t.grpc_url for ip, t in zip(IPS, tritons)}
    label = lambda ip: f'replica="{url[ip]}"'  # noqa: E731
    up = lambda: gateway_samples(gateway.metrics_url, "ragserve_triton_replica_up")  # noqa: E731
    calls = lambda: gateway_samples(gateway.metrics_url, "ragserve_triton_replica_calls_total")  # noqa: E731
    retries = lambda: gateway_samples(gateway.metrics_url, "ragserve_triton_retries_total")[""]  # noqa: E731
    served = lambda: [inferences(t) for t in tritons]  # noqa: E731

    # Only 127.0.0.2 in the answer: it alone is a replica, and it alone takes the calls.
    assert up() == {label(IPS[0]): 1}
    before = served()
    with ragserve.Client(gateway.address, timeout=30, retries=0) as client:
        for i in range(10):
            client.embed([f"one replica {i}"])
    counted(lambda: sum(served()) - sum(before), 10, "Triton counting the 10 calls")
    assert [after - b for after, b in zip(served(), before)] == [10, 0]
    assert calls() == {label(IPS[0]): 10}

    # 127.0.0.3 added to the answer: taken in at the next refresh, and calls land on both.
    dns.answer(list(IPS))
    wait_until(lambda: up().get(label(IPS[1])) == 1, 60, "127.0.0.3 taken in after the DNS answer grew")
    before, sent_before = served(), calls()
    with ragserve.Client(gateway.address, timeout=30, retries=0) as client:
        for i in range(20):
            client.embed([f"two replicas {i}"])
    counted(lambda: sum(served()) - sum(before), 20, "Triton counting the 20 calls")
    spread = [after - b for after, b in zip(served(), before)]
    assert sum(spread) == 20 and min(spread) >= 5, spread
    sent = calls()
    assert [sent[label(ip)] - sent_before.get(label(ip), 0) for ip in IPS] == spread  # the metrics say what Triton says

    # 127.0.0.2 dropped from the answer under a steady load: taken out, then stopped; no call fails.
    load = Load(gateway.address)
    try:
        load.at_least(5, "the steady load under way")
        dns.answer([IPS[1]])
        wait_until(lambda: label(IPS[0]) not in up(), 60, "127.0.0.2 taken out after the DNS answer shrank")
        tritons[0].stop()
        before = inferences(tritons[1])
        load.at_least(20, "calls served by 127.0.0.3 alone")
        counted(lambda: inferences(tritons[1]) - before, 20, "127.0.0.3 counting 20 calls")
    finally:
        load.stop()
    assert load.errors == [], load.errors[:3]
    assert set(up()) == {label(IPS[1])}
    assert retries() == 0  # no call was ever sent to a replica that had gone

    # SERVFAIL, then no DNS server at all: the gateway keeps 127.0.0.3 and keeps serving.
    failed = lambda: gateway.log_tail(10**7).count('"triton_dns_failed"')  # noqa: E731
    for failure in ("servfail", "stopped"):
        failed_before = failed()
        if failure == "servfail":
            dns.answer([], mode="servfail")
        else:
            dns.stop()
        wait_until(lambda: failed() >= failed_before + 3, 60, f"three lookups failing ({failure})")
        assert up() == {label(IPS[1]): 1}, failure
        with ragserve.Client(gateway.address, timeout=30, retries=0) as client:
            for i in range(5):
                client.embed([f"{failure} {i}"])
