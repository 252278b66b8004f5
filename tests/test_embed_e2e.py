"""Embed against the real Triton and gateway processes."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

import ragserve
from ragserve.v1 import embed_pb2, embed_pb2_grpc
from reference import cosine_rows, minilm_embeddings
from support import GatewayProcess, counted, wait_until

pytestmark = pytest.mark.integration

MIXED = [
    "hello",
    "The capital of France is Paris.",
    "Retrieval-augmented generation combines a retriever with a generator; "
    "the retriever finds passages and the generator conditions on them to answer questions.",
    "ünïcödé — 東京 is the capital of Japan 🚀",
    "a " * 40,
]
LONG = " ".join(f"word{i} alpha beta gamma" for i in range(120))  # far over 256 tokens


@pytest.fixture(scope="module")
def client(gateway):
    with ragserve.Client(gateway.address, timeout=30) as c:
        yield c


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert cosine_rows(got, want).min() >= 0.9999


def test_mixed_lengths_match_transformers(client):
    result = client.embed(MIXED)
    assert result.model == "all-minilm-l6-v2"
    assert result.embeddings.dtype == np.float32
    assert_close(result.embeddings, minilm_embeddings(MIXED))
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert result.usage.prompt_tokens == sum(len(t) for t in _token_ids(MIXED))


def test_small_and_large_executions_match_transformers(client):
    # The two sessions of each instance (tests/test_ort_template_unit.py): one row runs the
    # fused graph on two threads, more rows the plain graph on one. Both must equal the reference.
    one = ["a single query about refunds"]
    few = [f"query {i} about refunds" for i in range(4)]
    many = [f"passage {i} about shipping, refunds and the returns policy" for i in range(48)]
    for texts in (one, few, many):
        assert_close(client.embed(texts).embeddings, minilm_embeddings(texts))


def _token_ids(texts):
    from reference import _minilm

    tokenizer, _ = _minilm("right")
    return tokenizer(texts)["input_ids"]


def test_unnormalised_matches_pooled_output(client):
    result = client.embed(MIXED, normalize=False)
    want = minilm_embeddings(MIXED, normalize=False)
    assert_close(result.embeddings, want)
    np.testing.assert_allclose(result.embeddings, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("truncate,side", [("end", "right"), ("start", "left")])
def test_truncate_modes(client, truncate, side):
    texts = [LONG, "short one", "tail " + LONG[::-1]]
    result = client.embed(texts, truncate=truncate)
    assert_close(result.embeddings, minilm_embeddings(texts, truncation_side=side))
    assert result.usage.prompt_tokens == 256 + len(_token_ids(["short one"])[0]) + 256


@pytest.mark.parametrize("dimensions", [1, 64, 128, 384])
@pytest.mark.parametrize("normalize", [True, False])
def test_dimensions(client, dimensions, normalize):
    result = client.embed(MIXED, dimensions=dimensions, normalize=normalize)
    assert result.embeddings.shape == (len(MIXED), dimensions)
    if dimensions > 1:
        assert_close(result.embeddings, minilm_embeddings(MIXED, dimensions=dimensions, normalize=normalize))
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)


def test_input_order_kept_across_buckets(client):
    texts = [MIXED[i % len(MIXED)] + f" #{i}" for i in range(150)]
    result = client.embed(texts)
    assert_close(result.embeddings, minilm_embeddings(texts))


def minilm_counts(triton) -> tuple[int, int, int]:
    """minilm's (requests, executions, rows computed) so far, from Triton's statistics."""
    entry = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics("minilm", as_json=True)["model_stats"][0]
    # (Triton's JSON leaves out a count that is still 0.)
    success = entry.get("inference_stats", {}).get("success", {})
    return int(success.get("count", 0)), int(entry.get("execution_count", 0)), int(entry.get("inference_count", 0))


async def concurrent_single_calls(address: str, triton) -> tuple[int, int, int]:
    """64 single-sentence calls at once, each checked against the reference; Triton's
    (requests, executions, rows) for them."""
    before = minilm_counts(triton)
    async with ragserve.AsyncClient(address, timeout=60) as client:
        texts = [f"sentence number {i} about batching" for i in range(64)]
        results = await asyncio.gather(*(client.embed([t]) for t in texts))
    assert_close(np.concatenate([r.embeddings for r in results]), minilm_embeddings(texts))
    counted(lambda: minilm_counts(triton)[2] - before[2], 64, "Triton counting the 64 rows")
    return tuple(a - b for a, b in zip(settled_counts(triton), before))


def settled_counts(triton) -> tuple[int, int, int]:
    """minilm_counts once two reads 0.2 s apart agree: Triton counts requests one by one as it
    releases them, possibly after their answers arrived."""
    def agreeing():
        first = minilm_counts(triton)
        time.sleep(0.2)
        return first if minilm_counts(triton) == first else None

    return wait_until(agreeing, 30, "Triton's counts settling")


async def test_concurrent_single_calls_are_joined_by_the_gateway_and_batched_by_triton(gateway, triton):
    requests, executions, rows = await concurrent_single_calls(gateway.address, triton)
    assert rows == 64
    # The gateway's coalescer joined calls that came while Triton was busy with their shape.
    assert requests < 64, f"{requests} Triton requests for 64 calls: nothing was joined"
    assert executions <= requests


async def test_without_coalescing_every_call_is_a_request_and_triton_batches_them(triton, tmp_path):
    gateway = GatewayProcess(triton.grpc_url, triton.models, tmp_path / "gateway.log", "--coalesce-in-flight", "0").wait_serving()
    try:
        requests, executions, rows = await concurrent_single_calls(gateway.address, triton)
    finally:
        gateway.stop()
    assert requests == rows == 64
    assert executions < requests, f"{executions} executions for {requests} requests: no dynamic batching"


# --- bad input: a clear INVALID_ARGUMENT (or NOT_FOUND), and the server goes on serving ---

BAD_INPUTS = [
    (dict(inputs=[]), ragserve.InvalidArgumentError, "inputs is empty"),
    (dict(inputs=["ok", ""]), ragserve.InvalidArgumentError, "input 1 is an empty string"),
    (dict(inputs=["x"] * 2049), ragserve.InvalidArgumentError, "too many inputs: 2049 > 2048"),
    (dict(inputs=["ok", LONG]), ragserve.InvalidArgumentError, "input 1 has"),
    (dict(inputs=["ok", LONG], truncate="none"), ragserve.InvalidArgumentError, "limit of 256"),
    (dict(inputs=["ok"], dimensions=0), ragserve.InvalidArgumentError, "dimensions must be between 1 and 384"),
    (dict(inputs=["ok"], dimensions=385), ragserve.InvalidArgumentError, "got 385"),
    (dict(inputs=["ok"], model="no-such-model"), ragserve.ModelNotFoundError, "unknown model 'no-such-model'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_rejected_clearly(client, kwargs, error, message):
    inputs = kwargs.pop("inputs")
    with pytest.raises(error) as info:
        client.embed(inputs, **kwargs)
    assert message in info.value.message
    assert info.value.request_id
    assert client.embed(["still serving"]).embeddings.shape == (1, 384)


def test_invalid_utf8_from_a_raw_client(gateway, client):
    # Field 2 (inputs), length-delimited, bytes that are not UTF-8: the SDK cannot send this.
    payload = b"\x12\x03\xff\xfe\xfd"
    with grpc.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/ragserve.v1.Embed/Embed", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
    assert client.embed(["still serving"]).embeddings.shape == (1, 384)


def test_sdk_rejects_text_that_is_not_utf8(client):
    with pytest.raises(ragserve.InvalidArgumentError, match="not valid UTF-8"):
        client.embed(["ok", "bad \udcff surrogate"])


async def test_embed_stream_1000_messages_in_flight(gateway):
    texts = [f"bulk document {i}: " + "lorem ipsum " * (i % 7) for i in range(1000)]
    bad = {17: embed_pb2.EmbedRequest(inputs=[]), 500: embed_pb2.EmbedRequest(inputs=["x"], dimensions=999)}

    async def messages():
        for i, text in enumerate(texts):
            request = bad.get(i, embed_pb2.EmbedRequest(inputs=[text]))
            yield embed_pb2.EmbedStreamRequest(id=f"m{i}", request=request)

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        answers = {}
        async for answer in stub.EmbedStream(messages(), timeout=120):
            assert answer.id not in answers
            answers[answer.id] = answer
    assert len(answers) == 1000
    for i in bad:
        error = answers.pop(f"m{i}")
        assert error.WhichOneof("outcome") == "error"
        assert error.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    sample = [0, 1, 99, 999]
    vectors = np.array([answers[f"m{i}"].response.embeddings[0].values for i in sample], dtype=np.float32)
    assert_close(vectors, minilm_embeddings([texts[i] for i in sample]))
    assert all(a.WhichOneof("outcome") == "response" for a in answers.values())


def test_list_models(client):
    (model,) = [m for m in client.list_models() if m.kind == "embedding"]
    assert (model.name, model.kind, model.dimensions, model.max_input_tokens, model.is_default) == (
        "all-minilm-l6-v2", "embedding", 384, 256, True
    )


def test_request_id_is_echoed(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        _, call = stub.Embed.with_call(
            embed_pb2.EmbedRequest(inputs=["hi"]), metadata=[("x-request-id", "test-123")], timeout=10
        )
        assert ("x-request-id", "test-123") in call.trailing_metadata()


async def test_stream_sends_request_id_first(gateway):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        call = stub.EmbedStream(iter([embed_pb2.EmbedStreamRequest(id="a", request=embed_pb2.EmbedRequest(inputs=["hi"]))]), metadata=[("x-request-id", "stream-7")], timeout=10)
        assert ("x-request-id", "stream-7") in tuple(await call.initial_metadata())
        assert [answer.id async for answer in call] == ["a"]
