"""ReplicaSet without Triton: parsing targets, readiness per model, spreading, failover."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ragserve_server.errors import BackendUnavailable, InvalidInput
from ragserve_server.backend.replicas import RETIRE_GRACE, ReplicaSet, parse_targets
from ragserve_server.backend.targets import DnsLookupFailed, DnsTarget, resolve
from dns_server import ChangingDns
from support import eventually


class FakeReplica:
    """One Triton replica: answers with its own address; `down` fails like a dead process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.down = False
        self.models = {"minilm", "smollm2"}
        self.calls = 0
        self.fail_after_first = False  # streams: one response, then the connection drops

    async def is_ready(self, models):
        return not self.down and all(m in self.models for m in models)

    async def infer(self, model, inputs, outputs, *, timeout, priority=0):
        self.calls += 1
        if self.down:
            raise BackendUnavailable(f"model server unavailable: {self.address} is gone")
        if model == "bad":
            raise InvalidInput("bad input")
        return {"who": np.array([self.address], dtype=object), "timeout": np.array([timeout])}

    async def stream(self, model, inputs, outputs, *, timeout, priority=0):
        self.calls += 1
        if self.down:
            raise BackendUnavailable(f"{self.address} is gone")
        yield {"who": self.address}, False
        if self.fail_after_first:
            raise BackendUnavailable(f"{self.address} died mid-stream")
        yield {"who": self.address}, True

    async def batch_statistics(self, model):
        return {1: 2, 8: 1}

    async def model_config(self, model):
        raise BackendUnavailable("no config here")

    async def close(self, grace=None):
        self.closed = grace


def replica_set(target="a:1,b:1", models=("minilm", "smollm2")):
    fakes: dict[str, FakeReplica] = {}

    def factory(address):
        fakes[address] = FakeReplica(address)
        return fakes[address]

    return ReplicaSet(target, list(models), interval=0.05, backend_factory=factory), fakes


def test_parse_targets():
    assert parse_targets("a:1, b:2") == (["a:1", "b:2"], None)
    assert parse_targets("dns:///triton-headless.ns.svc:8001") == ([], DnsTarget("triton-headless.ns.svc", 8001))
    assert parse_targets("dns:triton:8001") == ([], DnsTarget("triton", 8001))
    # gRPC's authority form: that DNS server is asked directly (port 53 unless given).
    assert parse_targets("dns://10.96.0.10/t.ns.svc.cluster.local:8001") == ([], DnsTarget("t.ns.svc.cluster.local", 8001, ("10.96.0.10", 53)))
    assert parse_targets(" dns://127.0.0.1:5353/triton.test:8001 ") == ([], DnsTarget("triton.test", 8001, ("127.0.0.1", 5353)))
    assert parse_targets("dns://[fd00::a]:54/t:1")[1] == DnsTarget("t", 1, ("fd00::a", 54))
    assert parse_targets("dns://[::1]/t:1")[1].server == ("::1", 53)
    assert str(parse_targets("dns://[::1]/t:1")[1]) == "dns://[::1]:53/t:1"
    for bad, message in (
        ("", "no Triton address"),
        ("a", "not host:port"),
        ("a:x", "not host:port"),
        ("a:70000", "not host:port"),
        ("a:1,a:1", "given twice"),
        ("dns:///name", "not host:port"),
        ("dns://10.0.0.1:53/name", "not host:port"),
        ("dns://kube-dns:53/name:8001", "must be an IP address"),
        ("dns://10.0.0.1:99999/name:8001", "must be an IP address"),
        ("dns://10.0.0.1:x/name:8001", "must be an IP address"),
        ("dns://[::1/name:8001", "must be an IP address"),
        ("dns://10.0.0.1:53", "dns:///name:port or dns://DNS_SERVER_IP"),
        ("dns:/name:8001", "dns:///name:port or dns://DNS_SERVER_IP"),
        ("dns:///a:1,b:1", "one DNS name only"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_targets(bad)


async def test_calls_spread_over_ready_replicas_only():
    replicas, fakes = replica_set()
    await replicas.refresh()
    seen = [(await replicas.infer("minilm", {}, ["who"], timeout=5))["who"][0] for _ in range(10)]
    assert seen.count("a:1") == 5 and seen.count("b:1") == 5
    fakes["b:1"].models = {"smollm2"}  # answers, but has not loaded minilm
    await replicas.refresh()
    seen = [(await replicas.infer("minilm", {}, ["who"], timeout=5))["who"][0] for _ in range(4)]
    assert seen == ["a:1"] * 4
    assert await replicas.is_ready(["minilm"]) and await replicas.is_ready(["smollm2"])
    assert await replicas.batch_statistics("minilm") == {1: 4, 8: 2}  # summed over replicas


async def test_a_dead_replica_is_replaced_by_a_retry_and_taken_out():
    replicas, fakes = replica_set()
    await replicas.refresh()
    fakes["a:1"].down = True
    for _ in range(6):
        result = await replicas.infer("minilm", {}, ["who"], timeout=5)
        assert result["who"][0] == "b:1"
        assert 0 < result["timeout"][0] <= 5  # the retry runs within the caller's deadline
    assert fakes["a:1"].calls == 1  # failed once, then out of rotation at once
    assert replicas.retries == 1
    stats = {s.address: s for s in replicas.stats()}
    assert (stats["a:1"].up, stats["a:1"].failures) == (False, 1)
    assert await replicas.is_ready(["minilm"])  # health stays SERVING: b can serve
    fakes["a:1"].down = False
    await replicas.refresh()  # back when it answers ready again
    seen = {(await replicas.infer("minilm", {}, ["who"], timeout=5))["who"][0] for _ in range(4)}
    assert seen == {"a:1", "b:1"}


async def test_no_replica_left_is_unavailable_with_each_replicas_state():
    replicas, fakes = replica_set()
    await replicas.refresh()
    fakes["a:1"].down = fakes["b:1"].down = True
    with pytest.raises(BackendUnavailable):
        await replicas.infer("minilm", {}, ["who"], timeout=5)
    with pytest.raises(BackendUnavailable, match=r"unavailable: no Triton replica can serve model 'minilm' now: a:1 down, b:1 down"):
        await replicas.infer("minilm", {}, ["who"], timeout=5)
    assert not await replicas.is_ready([])


async def test_caller_errors_are_not_retried():
    replicas, fakes = replica_set(models=("bad",))
    for fake in fakes.values():
        fake.models.add("bad")
    await replicas.refresh()
    with pytest.raises(InvalidInput):
        await replicas.infer("bad", {}, ["who"], timeout=5)
    assert fakes["a:1"].calls + fakes["b:1"].calls == 1
    assert all(s.up for s in replicas.stats())


async def test_streams_retry_only_before_their_first_response():
    replicas, fakes = replica_set()
    await replicas.refresh()
    fakes["a:1"].down = True
    got = [item async for item in replicas.stream("smollm2", {}, ["who"], timeout=5)]
    assert [o["who"] for o, _ in got] == ["b:1", "b:1"]  # a failed before sending: retried on b
    fakes["b:1"].fail_after_first = True
    fakes["a:1"].down = False
    await replicas.refresh()
    replicas._next = 0  # b next
    received = []
    with pytest.raises(BackendUnavailable, match="died mid-stream"):
        async for outputs, _ in replicas.stream("smollm2", {}, ["who"], timeout=5):
            received.append(outputs["who"])
    assert received == ["b:1"]  # text was sent: not retried


async def test_dns_target_follows_the_addresses_it_resolves_to():
    replicas, fakes = replica_set("dns:///localhost:8001", models=("minilm",))
    await replicas.start()
    try:
        assert "127.0.0.1:8001" in replicas.replicas
        assert await replicas.is_ready(["minilm"])
    finally:
        await replicas.close()


async def test_refresh_runs_in_the_background():
    replicas, fakes = replica_set()
    await replicas.start()
    try:
        fakes["a:1"].down = True
        await eventually(lambda: [s.up for s in replicas.stats()] == [False, True], what="the background refresh marking a:1 down")
    finally:
        await replicas.close()


async def test_a_dns_server_target_follows_the_answer_and_keeps_it_through_failures():
    dns = ChangingDns("triton.test", ["127.0.0.2"])
    replicas, fakes = replica_set(f"dns://{dns.authority}/triton.test:8001", models=("minilm",))
    try:
        await replicas.start()
        assert list(replicas.replicas) == ["127.0.0.2:8001"]
        assert await replicas.is_ready(["minilm"])
        dns.answer(["127.0.0.2", "127.0.0.3", "::1"])
        await replicas.refresh()
        assert sorted(replicas.replicas) == ["127.0.0.2:8001", "127.0.0.3:8001", "[::1]:8001"]
        dns.answer(["127.0.0.3"])
        await replicas.refresh()
        assert list(replicas.replicas) == ["127.0.0.3:8001"]
        # Its channel closes with a grace: the calls in flight on it end first.
        await eventually(lambda: getattr(fakes["127.0.0.2:8001"], "closed", None) == RETIRE_GRACE, what="the removed replica closed")
        # Failures keep the replicas we had: SERVFAIL, an answer without records, no server.
        dns.answer(["127.0.0.4"], mode="servfail")
        await replicas.refresh()
        dns.answer([])
        await replicas.refresh()
        dns.stop()
        await replicas.refresh()
        assert list(replicas.replicas) == ["127.0.0.3:8001"]
        assert await replicas.is_ready(["minilm"])
    finally:
        dns.stop()
        await replicas.close()


async def test_a_truncated_dns_answer_is_asked_again_over_tcp():
    dns = ChangingDns("triton.test", ["127.0.0.2", "127.0.0.3"])
    try:
        dns.answer(["127.0.0.2", "127.0.0.3"], mode="truncate")
        target = parse_targets(f"dns://{dns.authority}/triton.test:8001")[1]
        assert await resolve(target) == ["127.0.0.2:8001", "127.0.0.3:8001"]
        assert dns.questions["tcp"] == 2  # A and AAAA, each after a truncated UDP answer
        with pytest.raises(DnsLookupFailed, match="no A or AAAA record"):
            await resolve(DnsTarget("other.test", 1, ("127.0.0.1", dns.port)))  # NXDOMAIN
    finally:
        dns.stop()


async def test_a_dns_server_that_never_answers_fails_within_the_timeout():
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read
        silent.bind(("127.0.0.1", 0))
        target = DnsTarget("triton.test", 8001, silent.getsockname())
        start = time.monotonic()
        with pytest.raises(DnsLookupFailed, match="TimeoutError"):
            await resolve(target, timeout=0.3)
        assert time.monotonic() - start < 10


async def test_close_ends_the_refresh_loop_while_dns_lookups_fail_at_once():
    # No server at that port: every question is refused at once (ICMP port unreachable). A
    # cancellation landing as such a lookup ends must still stop the loop (asyncio.wait_for in
    # Python 3.11 swallowed it, and close() hung).
    dns = ChangingDns("triton.test", ["127.0.0.2"])
    dns.stop()
    for attempt in range(30):
        replicas, _ = replica_set(f"dns://{dns.authority}/triton.test:8001", models=("minilm",))
        replicas.interval = 0
        await replicas.start()
        await asyncio.sleep(0.002 * (attempt % 5))
        closing = asyncio.ensure_future(replicas.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        assert done, f"close() hung on attempt {attempt}"
