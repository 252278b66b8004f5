"""Beyond one machine, on loopback: two real Triton replicas behind one gateway (spreading,
SIGKILL under load, restart), a Generate stream on a killed replica, and two gateways
behind the SDK's default round_robin."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2

import ragserve
from ragserve_server.models.builtin import smollm2_spec
from ragserve_server.supervision.triton_launcher import TritonServer
from support import MODEL_REPOSITORY, GatewayProcess, counted, free_port, health_status, start_triton, wait_for_health, wait_until

pytestmark = pytest.mark.integration

EMBED = "ragserve.v1.Embed"


def inferences(triton: TritonServer, model: str = "minilm") -> int:
    """Requests the replica has executed for `model` since it started (its statistics)."""
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    stats = client.get_inference_statistics(model, as_json=True)
    return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats.get("model_stats", []))


def gateway_samples(url: str, name: str) -> dict[str, float]:
    """{labels text: value} of one metric in a gateway scrape."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.M)}


def restart(triton: TritonServer) -> TritonServer:
    triton.stop()  # it was killed: this ends the python-backend stubs it left behind
    again = TritonServer(triton.model_repository, triton.models, triton.ports, triton.work_dir)
    again.start()
    again.wait_ready(120)
    return again


@pytest.fixture
def two_replicas(tmp_path):
    tritons = [start_triton(tmp_path / f"triton{i}", ["minilm"]) for i in range(2)]
    gateway = GatewayProcess(
        ",".join(t.grpc_url for t in tritons), ["minilm"], tmp_path / "gateway.log", metrics_port=free_port()
    )
    try:
        gateway.wait_serving()
        yield tritons, gateway
    finally:
        gateway.stop()
        for triton in tritons:
            triton.stop()


def test_calls_spread_and_survive_a_sigkilled_replica(two_replicas):
    tritons, gateway = two_replicas
    replica = lambda t: f'replica="{t.grpc_url}"'  # noqa: E731
    calls = lambda: gateway_samples(gateway.metrics_url, "ragserve_triton_replica_calls_total")  # noqa: E731
    with ragserve.Client(gateway.address, timeout=30) as client:
        before, sent_before = [inferences(t) for t in tritons], calls()
        for i in range(20):
            client.embed([f"spread {i}"])
        counted(lambda: sum(inferences(t) - b for t, b in zip(tritons, before)), 20, "Triton counting the 20 calls")
        spread = [inferences(t) - b for t, b in zip(tritons, before)]
        assert sum(spread) == 20 and min(spread) >= 5, spread  # both replicas took calls
        # The per-replica metrics say what each Triton's own statistics say.
        sent = calls()
        assert [sent[replica(t)] - sent_before.get(replica(t), 0) for t in tritons] == spread
        assert all(v == 1 for v in gateway_samples(gateway.metrics_url, "ragserve_triton_replica_up").values())
        ready = gateway_samples(gateway.metrics_url, "ragserve_triton_replica_ready_models")
        assert [ready[replica(t)] for t in tritons] == [1, 1]
        retries_before = gateway_samples(gateway.metrics_url, "ragserve_triton_retries_total")[""]
        assert retries_before == 0

    # Bounded load from 4 threads; replica 0 is killed with SIGKILL in the middle.
    errors: list[Exception] = []
    done = [0]
    not_serving: list[int] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with ragserve.Client(gateway.address, timeout=30) as client:
            for i in range(60):
                try:
                    client.embed([f"worker {worker} call {i}", "a second sentence"])
                    done[0] += 1
                except ragserve.RagserveError as exc:
                    errors.append(exc)
                if stop.is_set():
                    return

    def watch_health() -> None:
        while not stop.is_set():
            status = health_status(gateway.address, EMBED)
            if status is not None and status != health_pb2.HealthCheckResponse.SERVING:
                not_serving.append(status)
            time.sleep(0.05)

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    watcher = threading.Thread(target=watch_health)
    for thread in (*threads, watcher):
        thread.start()
    wait_until(lambda: done[0] >= 8, 60, "the load under way")
    tritons[0].process.kill()
    tritons[0].process.wait()
    for thread in threads:
        thread.join(120)
    stop.set()
    watcher.join(10)
    assert errors == [], errors[:3]
    assert done[0] == 240
    assert not_serving == []  # health stayed SERVING: the other replica could serve
    samples = gateway_samples(gateway.metrics_url, "ragserve_triton_replica_failures_total")
    assert samples[f'replica="{tritons[0].grpc_url}"'] >= 1
    assert gateway_samples(gateway.metrics_url, "ragserve_triton_replica_up")[f'replica="{tritons[0].grpc_url}"'] == 0
    # No call failed although some were on the killed replica: they were retried on the other.
    assert gateway_samples(gateway.metrics_url, "ragserve_triton_retries_total")[""] >= 1

    # Started again on the same ports: it takes calls again, no gateway restart.
    tritons[0] = restart(tritons[0])
    wait_until(
        lambda: gateway_samples(gateway.metrics_url, "ragserve_triton_replica_up")[f'replica="{tritons[0].grpc_url}"'] == 1,
        60, "the restarted replica taken back",
    )
    with ragserve.Client(gateway.address, timeout=30) as client:
        for i in range(10):
            client.embed([f"after restart {i}"])
    assert counted(lambda: inferences(tritons[0]), 3, "the restarted replica counting its calls") >= 3


def test_two_gateways_behind_the_sdks_default_balancing(triton, tmp_path):
    gateways = [
        GatewayProcess(triton.grpc_url, triton.models, tmp_path / f"gateway{i}.log", metrics_port=free_port()).wait_serving()
        for i in range(2)
    ]
    try:
        target = "ipv4:" + ",".join(g.address for g in gateways)
        with ragserve.Client(target, timeout=30) as client:  # round_robin is the default
            for i in range(20):
                client.embed([f"balanced {i}"])
        counts = []
        for gateway in gateways:
            samples = gateway_samples(gateway.metrics_url, "ragserve_requests_total")
            counts.append(sum(v for k, v in samples.items() if 'method="Embed"' in k))
        assert sum(counts) == 20 and min(counts) >= 5, counts
    finally:
        for gateway in gateways:
            gateway.stop()


def generated_tokens(triton: TritonServer) -> float:
    """The engine's token counter on that replica's metrics port."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(r"^ragserve_engine_generated_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_generate_stream_on_a_killed_replica_ends_unavailable(tmp_path):
    if smollm2_spec(MODEL_REPOSITORY).missing_artifacts(MODEL_REPOSITORY):
        pytest.fail("SmolLM2 is not built: run `make models`")
    tritons = [start_triton(tmp_path / f"triton{i}", ["smollm2"]) for i in range(2)]
    gateway = GatewayProcess(",".join(t.grpc_url for t in tritons), ["smollm2"], tmp_path / "gateway.log")
    try:
        gateway.wait_serving(timeout=120)
        with ragserve.Client(gateway.address, timeout=120) as client:
            story = [{"role": "user", "content": "Write a long story about a lighthouse keeper and her cat."}]
            stream = client.stream(messages=story, max_tokens=1000, temperature=0)  # still running when its replica dies
            first = next(stream)
            assert isinstance(first, ragserve.TextDelta)
            # Triton refreshes its metrics page every few seconds.
            serving = wait_until(lambda: [t for t in tritons if generated_tokens(t) > 0], 60, "a replica reporting generated tokens")
            assert len(serving) == 1
            serving[0].process.kill()
            serving[0].process.wait()
            with pytest.raises(ragserve.UnavailableError):
                for _ in stream:
                    pass
            # New streams go to the live replica.
            wait_for_health(gateway.address, "ragserve.v1.Generate", timeout=60)
            answer = client.generate(messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0)
            assert answer.usage.completion_tokens >= 1
    finally:
        gateway.stop()
        for triton in tritons:
            triton.stop()
