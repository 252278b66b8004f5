"""Fast tests of the gateway in-process, with a fake backend in place of Triton."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import structlog
from hypothesis import given, settings as hypothesis_settings, strategies as st

import ragserve
from ragserve_server.app import create_gateway
from ragserve_server.models.catalog import build_catalog
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.errors import BackendUnavailable, DeadlineExceeded, InvalidInput, Overloaded
from ragserve_server.settings import Settings
from ragserve_server.backend.triton import map_triton_error
from fakes import FakeBackend


@pytest.fixture
async def fake_stack():
    backend = FakeBackend()
    catalog = build_catalog([minilm_spec()])
    settings = Settings(port=0, max_concurrent_requests=2, health_poll_interval=0.05)
    gateway = await create_gateway(settings, backend, catalog)
    client = ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0)  # rejections are counted exactly
    yield backend, client
    await client.close()
    await gateway.stop(0)


async def test_embed_through_fake_backend(fake_stack):
    backend, client = fake_stack
    result = await client.embed(["hello world", "hi"], normalize=False, dimensions=2)
    # [CLS] hello world [SEP] = 101 + 7592 + 2088 + 102
    np.testing.assert_allclose(result.embeddings, [[101 + 7592 + 2088 + 102, 1.0], [101 + 7632 + 102, 1.0]])
    assert result.usage.prompt_tokens == 7


async def test_overload_answers_resource_exhausted_at_once(fake_stack):
    backend, client = fake_stack
    backend.delay = 1.0
    results = await asyncio.gather(*(client.embed([f"text {i}"], timeout=10) for i in range(6)), return_exceptions=True)
    overloaded = [r for r in results if isinstance(r, ragserve.OverloadedError)]
    served = [r for r in results if isinstance(r, ragserve.EmbedResult)]
    assert len(served) == 2 and len(overloaded) == 4
    assert "capacity" in overloaded[0].message
    backend.delay = 0.0
    assert (await client.embed(["after"])).embeddings.shape == (1, 384)  # permits were given back


async def test_deadline_is_carried_to_the_backend(fake_stack):
    backend, client = fake_stack
    await client.embed(["x"], timeout=2.0)
    assert 0 < backend.timeouts[-1] <= 2.0
    backend.delay = 5.0
    with pytest.raises(ragserve.DeadlineExceededError):
        await client.embed(["slow"], timeout=0.3)


async def test_backend_errors_map_to_status_codes(fake_stack):
    backend, client = fake_stack
    for error, sdk_error in (
        (BackendUnavailable("model server unavailable: down"), ragserve.UnavailableError),
        (Overloaded("queue full"), ragserve.OverloadedError),
        (DeadlineExceeded("late"), ragserve.DeadlineExceededError),
        (RuntimeError("a bug"), ragserve.ServerError),
    ):
        backend.fail = error
        with pytest.raises(sdk_error):
            await client.embed(["x"], timeout=5)
    backend.fail = None
    assert (await client.embed(["fine again"])).embeddings.shape == (1, 384)


async def test_access_log_line_carries_request_id(fake_stack):
    _, client = fake_stack
    with structlog.testing.capture_logs() as logs:
        await client.embed(["logged"])
    (access,) = [e for e in logs if e["event"] == "rpc"]
    assert access["status"] == "OK" and access["prompt_tokens"] == 3
    assert "duration_ms" in access


@pytest.mark.parametrize(
    "status,message,error",
    [
        ("StatusCode.UNAVAILABLE", "failed to connect", BackendUnavailable),
        ("DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded),
        ("", "RESOURCE_EXHAUSTED: waiting queue is full (64)", Overloaded),
        ("INTERNAL", "INVALID_ARGUMENT: prompt too long", InvalidInput),
        ("INTERNAL", "Request for unknown model: 'x' is not found", BackendUnavailable),
    ],
)
def test_triton_error_table(status, message, error):
    mapped = map_triton_error(status, message)
    assert type(mapped) is error
    if message.startswith(("RESOURCE_EXHAUSTED:", "INVALID_ARGUMENT:")):
        assert mapped.message == message.split(":", 1)[1].strip()


def test_settings_flags_have_environment_twins():
    settings = Settings.from_args(["--port", "6000"], env={"RAGSERVE_PORT": "7000", "RAGSERVE_MAX_INPUTS_PER_CALL": "5"})
    assert settings.port == 6000  # the flag wins
    assert settings.max_inputs_per_call == 5
    assert Settings.from_args([], env={}).port == 50051


async def test_models_health_stays_serving_while_triton_is_down(fake_stack):
    """The liveness probe's service (deploy/kubernetes) needs no Triton model: a Triton outage
    turns "" and Embed NOT_SERVING (readiness) but never restarts the gateway."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    backend, client = fake_stack
    backend.fail = BackendUnavailable("triton is down")
    health = health_pb2_grpc.HealthStub(client._channels[0])

    async def status(service: str) -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status

    for _ in range(100):
        if await status("") == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.02)
    assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status("ragserve.v1.Embed") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status("ragserve.v1.Models") == health_pb2.HealthCheckResponse.SERVING


@given(rows=st.integers(1, 40), dimensions=st.sampled_from([1, 2, 31, 32, 128, 384, 1024]), seed=st.integers(0, 2**16))
@hypothesis_settings(max_examples=40, deadline=None)
def test_embedding_messages_equal_the_message_built_from_values(rows, dimensions, seed):
    """The hand-encoded Embedding bytes (services/embed.py) parse to what Embedding(values=...) holds."""
    from ragserve.v1 import embed_pb2
    from ragserve_server.services.embed import embedding_messages

    vectors = np.random.default_rng(seed).standard_normal((rows, dimensions)).astype(np.float32)
    assert embedding_messages(vectors) == [embed_pb2.Embedding(values=row) for row in vectors.tolist()]
