"""The SDK's retries (gRPC's retry policy from the channel's service config), against a small
local grpc.aio server that refuses a set number of attempts before it answers."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

import ragserve
from ragserve import _channel, _protocol
from ragserve.v1 import embed_pb2, embed_pb2_grpc, generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc


class Refusing:
    """Refuses the first `failures` attempts of each call with `code` and a pushback trailer."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.pushback_ms: str | None = None
        self.attempts = 0
        self.times: list[float] = []

    async def attempt(self, context) -> None:
        self.attempts += 1
        self.times.append(time.monotonic())
        if self.attempts <= self.failures:
            trailers = (("grpc-retry-pushback-ms", self.pushback_ms),) if self.pushback_ms is not None else ()
            await context.abort(self.code, f"refused attempt {self.attempts}", trailing_metadata=trailers)


class EmbedServicer(embed_pb2_grpc.EmbedServicer):
    def __init__(self, refusing: Refusing) -> None:
        self.refusing = refusing

    async def Embed(self, request, context):
        await self.refusing.attempt(context)
        return embed_pb2.EmbedResponse(model="fake", embeddings=[embed_pb2.Embedding(values=[1.0, 0.0]) for _ in request.inputs])


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    def __init__(self, refusing: Refusing) -> None:
        self.refusing = refusing

    async def ListModels(self, request, context):
        await self.refusing.attempt(context)
        return models_pb2.ListModelsResponse(models=[models_pb2.ModelInfo(name="fake")])


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    def __init__(self, refusing: Refusing) -> None:
        self.refusing = refusing

    async def Generate(self, request, context):
        await self.refusing.attempt(context)
        return generate_pb2.GenerateResponse(model="fake", text="hi")


@pytest.fixture
async def refusing_server():
    refusing = Refusing()
    server = grpc.aio.server()
    embed_pb2_grpc.add_EmbedServicer_to_server(EmbedServicer(refusing), server)
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(refusing), server)
    generate_pb2_grpc.add_GenerateServicer_to_server(GenerateServicer(refusing), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield refusing, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_retries_follow_the_pushback_until_ok(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 2, "300"
    async with ragserve.AsyncClient(address, timeout=10) as client:
        result = await client.embed(["hello"])
    assert result.embeddings.shape == (1, 2)
    assert refusing.attempts == 3
    gaps = [b - a for a, b in zip(refusing.times, refusing.times[1:])]
    # The server's 300 ms, not the policy's own backoff (a random wait under 0.1 s, then 0.2 s).
    # (The upper bound only catches a retry that never came; a loaded machine adds delay.)
    assert all(0.28 <= gap < 10 for gap in gaps), gaps


async def test_without_retries_the_first_refusal_is_raised(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 2, "10"
    async with ragserve.AsyncClient(address, timeout=10, retries=0) as client:
        with pytest.raises(ragserve.OverloadedError, match="refused attempt 1"):
            await client.embed(["hello"])
    assert refusing.attempts == 1


async def test_blocking_client_retries_unavailable_too(refusing_server):
    """The blocking client, in a thread: the server runs on this test's event loop."""
    refusing, address = refusing_server
    refusing.failures, refusing.code = 3, grpc.StatusCode.UNAVAILABLE  # no pushback: jittered backoff

    def call():
        with ragserve.Client(address, timeout=10) as client:
            return client.list_models()

    assert [m.name for m in await asyncio.to_thread(call)] == ["fake"]
    assert refusing.attempts == 4


async def test_attempts_are_bounded_by_retries(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 100, "20"
    async with ragserve.AsyncClient(address, timeout=10, retries=2) as client:
        with pytest.raises(ragserve.OverloadedError):
            await client.embed(["hello"])
    assert refusing.attempts == 3


async def test_the_deadline_bounds_the_retries(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 100, "400"
    async with ragserve.AsyncClient(address, retries=4) as client:
        started = time.monotonic()
        with pytest.raises((ragserve.DeadlineExceededError, ragserve.OverloadedError)):
            await client.embed(["hello"], timeout=1.0)
        elapsed = time.monotonic() - started
    # Without the deadline, 5 attempts 0.4 s apart; a loaded machine adds delay, never attempts.
    assert elapsed < 10, elapsed
    assert refusing.attempts <= 3  # 0, 0.4, 0.8 s: no attempt after the deadline


async def test_negative_pushback_stops_the_retries(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 3, "-1"
    async with ragserve.AsyncClient(address, timeout=10) as client:
        with pytest.raises(ragserve.OverloadedError):
            await client.embed(["hello"])
    assert refusing.attempts == 1


async def test_generate_is_not_retried(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 1, "10"
    async with ragserve.AsyncClient(address, timeout=10) as client:
        with pytest.raises(ragserve.OverloadedError):
            await client.generate("hello")
    assert refusing.attempts == 1


async def test_retries_and_round_robin_in_one_service_config(refusing_server):
    refusing, address = refusing_server
    refusing.failures, refusing.pushback_ms = 1, "10"
    async with ragserve.AsyncClient(f"ipv4:{address}", timeout=10, load_balancing="round_robin") as client:
        assert (await client.embed(["x"])).embeddings.shape == (1, 2)
    assert refusing.attempts == 2
    options = dict(_channel.channel_options("round_robin", [], 2))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    assert method_config["retryPolicy"]["maxAttempts"] == 3
    assert {(n["service"], n["method"]) for n in method_config["name"]} == {
        ("ragserve.v1.Embed", "Embed"),
        ("ragserve.v1.Rerank", "Rerank"),
        ("ragserve.v1.Models", "ListModels"),
        ("ragserve.v1.Tokenize", "Tokenize"),
        ("ragserve.v1.Tokenize", "Detokenize"),
    }


def test_retry_settings_are_checked():
    assert "grpc.service_config" not in dict(_channel.channel_options(None, [], 0))
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(ValueError, match="retries"):
            ragserve.Client(retries=bad)
    mine = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    options = _channel.channel_options("round_robin", [("grpc.service_config", mine)], 3)
    assert [value for name, value in options if name == "grpc.service_config"] == [mine]  # the caller's wins


@pytest.mark.parametrize(("load_balancing", "spread"), [({}, True), ({"load_balancing": "pick_first"}, False)])
async def test_a_target_with_several_gateways_gets_its_calls_spread_by_default(load_balancing, spread):
    """Two servers behind one ipv4: target: the default client uses both, pick_first one."""
    servers, counters = [], []
    try:
        for _ in range(2):
            refusing = Refusing()
            server = grpc.aio.server()
            embed_pb2_grpc.add_EmbedServicer_to_server(EmbedServicer(refusing), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append((server, f"127.0.0.1:{port}"))
            counters.append(refusing)
        target = "ipv4:" + ",".join(address for _, address in servers)
        async with ragserve.AsyncClient(target, timeout=10, **load_balancing) as client:
            for i in range(20):
                await client.embed([f"call {i}"])
        attempts = sorted(c.attempts for c in counters)
        assert sum(attempts) == 20
        assert (attempts[0] >= 5) if spread else (attempts == [0, 20]), attempts
    finally:
        for server, _ in servers:
            await server.stop(0)
