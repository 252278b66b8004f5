"""Tokenize / Detokenize against the real gateway and Triton (embedding model, bi-encoder,
cross-encoder); the generation model's tokenizer in-process is in test_tokenize_inprocess.py."""

from __future__ import annotations

import grpc
import pytest
from transformers import AutoTokenizer

import ragserve
from ragserve.v1 import tokenize_pb2, tokenize_pb2_grpc
from ragserve_server.models.builtin import minilm_spec
from support import health_status

pytestmark = pytest.mark.integration

TEXTS = ["hello world", "The capital of France is Paris.", "ünïcödé — 東京 🚀 tokenizers", "Tokenization isn't trivial!"]
LONG = " ".join(f"word{i} alpha beta" for i in range(200))  # far over 256 tokens


@pytest.fixture(scope="module")
def client(gateway):
    with ragserve.Client(gateway.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(minilm_spec().tokenizer_dir)


def test_ids_offsets_and_counts_match_the_model_tokenizer(client, hf):
    result = client.tokenize(TEXTS, return_tokens=True)
    assert result.model == "all-minilm-l6-v2"
    want = hf(TEXTS, return_offsets_mapping=True)
    for text, got, ids, offsets in zip(TEXTS, result.results, want["input_ids"], want["offset_mapping"]):
        assert got.ids == ids
        assert got.offsets == [tuple(o) for o in offsets]
        assert got.tokens == hf.convert_ids_to_tokens(ids)
        assert got.count == len(ids) == got.untruncated_count and not got.truncated
        assert got.offsets[0] == (0, 0) and got.tokens[0] == "[CLS]"
        # Offsets are character spans of the caller's text.
        for (start, end), token in zip(got.offsets[1:-1], got.tokens[1:-1]):
            if token != "[UNK]":
                assert text[start:end].lower().replace("ü", "u").replace("ï", "i").replace("ö", "o").replace("é", "e") == token.removeprefix("##")
    assert result.usage.prompt_tokens == sum(len(i) for i in want["input_ids"])
    assert not client.tokenize(["hello"]).results[0].tokens  # strings only when asked


def test_counts_agree_with_embed(client):
    counts = [r.count for r in client.tokenize(TEXTS).results]
    assert client.embed(TEXTS).usage.prompt_tokens == sum(counts)


def test_truncation_rules_are_embeds(client, hf):
    with pytest.raises(ragserve.InvalidArgumentError, match="input 1 has .* tokens, more than the model's limit of 256"):
        client.tokenize(["short", LONG])
    full = hf(LONG)["input_ids"]
    end = client.tokenize([LONG], truncate="end").results[0]
    assert end.ids == full[:255] + [102] and end.untruncated_count == len(full) and end.truncated
    start = client.tokenize([LONG], truncate="start").results[0]
    assert start.ids == [101] + full[-255:] and start.untruncated_count == len(full)
    assert start.offsets[-2][1] == len(LONG)  # the kept end of the text
    assert client.embed([LONG], truncate="end").usage.prompt_tokens == 256


def test_detokenize_round_trips(client, hf):
    ids = client.tokenize(["The capital of France is Paris."]).results[0].ids
    assert client.detokenize(ids) == "the capital of france is paris."
    assert client.detokenize(ids, skip_special_tokens=False) == "[CLS] the capital of france is paris. [SEP]"
    assert client.detokenize([]) == ""


def test_bad_input_names_the_field(gateway, client):
    vocab = AutoTokenizer.from_pretrained(minilm_spec().tokenizer_dir).vocab_size
    with pytest.raises(ragserve.InvalidArgumentError, match=rf"ids\[1\] is {vocab}, outside model all-minilm-l6-v2's vocabulary: ids go from 0 to {vocab - 1}"):
        client.detokenize([101, vocab])
    with pytest.raises(ragserve.InvalidArgumentError, match="inputs is empty"):
        client.tokenize([])
    with pytest.raises(ragserve.InvalidArgumentError, match="too many inputs: 2049 > 2048 per call"):
        client.tokenize(["x"] * 2049)
    with pytest.raises(ragserve.ModelNotFoundError):
        client.tokenize(["x"], model="nope")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = tokenize_pb2_grpc.TokenizeStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(tokenize_pb2.TokenizeRequest(inputs=["x"], input_type=7), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_type 7" in info.value.details()


def test_health_and_reflection_list_the_service(gateway):
    from grpc_health.v1 import health_pb2

    assert health_status(gateway.address, "ragserve.v1.Tokenize") == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert "ragserve.v1.Tokenize" in {s.name for s in reply.list_services_response.service}


def test_rerankers_have_tokenizers(rerank_gateway, cross_encoder):
    with ragserve.Client(rerank_gateway.address, timeout=30) as client:
        ce = client.tokenize(["a document"], model=cross_encoder.name)
        assert ce.model == cross_encoder.name
        assert ce.results[0].ids == AutoTokenizer.from_pretrained(cross_encoder.hf_folder)("a document")["input_ids"]
        bi = client.tokenize(["a document"], model="all-minilm-l6-v2-bi-encoder")
        assert bi.results[0].ids == ce.results[0].ids  # the same MiniLM vocabulary
        assert client.detokenize(bi.results[0].ids, model=cross_encoder.name) == "a document"
