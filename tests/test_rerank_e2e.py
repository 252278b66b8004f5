"""Rerank against the real Triton and gateway processes: the embedded bi-encoder and a
cross-encoder checkpoint built and exported by the test session (see conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

import ragserve
from reference import _cross_encoder, cross_encoder_logits, minilm_embeddings
from support import counted

pytestmark = pytest.mark.integration

BI_ENCODER = "all-minilm-l6-v2-bi-encoder"
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Berlin is the capital and largest city of Germany.",
    "Paris is the capital and most populous city of France.",
    "France is famous for its wine and cheese.",
    "",  # empty documents are allowed and scored
    "The Eiffel Tower stands in Paris, on the Champ de Mars.",
    "ünïcödé — 東京 is the capital of Japan 🚀",
    "Photosynthesis turns light, water and carbon dioxide into sugar. " * 8,
]
LONG = " ".join(f"word{i} alpha beta gamma" for i in range(150))  # over 512 tokens


@pytest.fixture(scope="module")
def client(rerank_gateway):
    with ragserve.Client(rerank_gateway.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def cross_name(cross_encoder):
    return cross_encoder.name


def scores_by_index(result: ragserve.RerankResult, raw: bool = False) -> np.ndarray:
    scores = np.full(len(result.results), np.nan)
    for r in result.results:
        scores[r.index] = r.raw_score if raw else r.relevance_score
        assert 0.0 <= r.relevance_score <= 1.0
    return scores


def assert_sorted_stably(result: ragserve.RerankResult) -> None:
    keys = [(-r.relevance_score, r.index) for r in result.results]
    assert keys == sorted(keys), "not sorted by score, best first, ties in request order"


# --- cross-encoder: the service gives exactly what transformers gives -----------------------


@pytest.mark.parametrize("raw", [False, True])
def test_cross_encoder_scores_match_transformers(client, cross_encoder, raw):
    result = client.rerank(QUERY, DOCUMENTS, model=cross_encoder.name, raw_scores=raw)
    assert result.model == cross_encoder.name
    logits = cross_encoder_logits(cross_encoder.hf_folder, QUERY, DOCUMENTS)
    assert np.abs(scores_by_index(result) - 1 / (1 + np.exp(-logits))).max() < 1e-4  # relevance: sigmoid(logit)
    if raw:
        assert np.abs(scores_by_index(result, raw=True) - logits).max() < 1e-4
    assert_sorted_stably(result)
    assert all((r.raw_score is not None) == raw for r in result.results)
    assert np.ptp(1 / (1 + np.exp(-logits))) > 0.05, "the test head should spread the scores"


@pytest.mark.parametrize("truncate,side", [("end", "right"), ("start", "left")])
def test_cross_encoder_truncates_the_document_side(client, cross_encoder, truncate, side):
    documents = [LONG, "short one", "tail " + LONG[::-1]]
    result = client.rerank(QUERY, documents, model=cross_encoder.name, truncate=truncate, raw_scores=True)
    want = cross_encoder_logits(cross_encoder.hf_folder, QUERY, documents, truncation_side=side)
    assert np.abs(scores_by_index(result, raw=True) - want).max() < 1e-4
    tokenizer, _ = _cross_encoder(str(cross_encoder.hf_folder), side)
    pairs = tokenizer([QUERY] * 3, documents, truncation="only_second", max_length=512)["input_ids"]
    assert result.usage.prompt_tokens == sum(len(p) for p in pairs)
    assert max(len(p) for p in pairs) == 512


def test_cross_encoder_1000_documents_are_sent_in_chunks(client, cross_encoder, triton):
    stats = triton_grpc.InferenceServerClient(triton.grpc_url)

    def requests():
        entry = stats.get_inference_statistics(cross_encoder.model_dir.name, as_json=True)["model_stats"][0]
        return int(entry.get("inference_stats", {}).get("success", {}).get("count", 0))

    documents = [f"document {i}: the quick brown fox jumps over lazy dog number {i % 37}" for i in range(1000)]
    before = requests()
    result = client.rerank("which fox is quick?", documents, model=cross_encoder.name)
    assert sorted(r.index for r in result.results) == list(range(1000))
    assert_sorted_stably(result)
    # Chunks of at most --triton-batch-rows (64) rows, each its own Triton request.
    assert requests() - before >= 1000 // 64
    sample = [0, 1, 500, 999]
    want = 1 / (1 + np.exp(-cross_encoder_logits(cross_encoder.hf_folder, "which fox is quick?", [documents[i] for i in sample])))
    assert np.abs(scores_by_index(result)[sample] - want).max() < 1e-4


# --- bi-encoder (the default): cosine of the Embed service's own vectors ---------------------


@pytest.mark.parametrize("raw", [False, True])
def test_bi_encoder_scores_equal_cosine_of_embed_vectors(client, raw):
    result = client.rerank(QUERY, DOCUMENTS[:3] + DOCUMENTS[4:], raw_scores=raw)  # default model
    documents = DOCUMENTS[:3] + DOCUMENTS[4:]
    assert result.model == BI_ENCODER
    query = client.embed([QUERY]).embeddings[0]
    vectors = client.embed(documents).embeddings
    np.testing.assert_allclose(scores_by_index(result), (vectors @ query + 1) / 2, atol=1e-5)  # relevance: (cosine + 1) / 2
    assert all((r.raw_score is not None) == raw for r in result.results)
    if raw:
        np.testing.assert_allclose(scores_by_index(result, raw=True), vectors @ query, atol=1e-5)
    np.testing.assert_allclose(vectors @ query, minilm_embeddings(documents) @ minilm_embeddings([QUERY])[0], atol=1e-4)


def test_bi_encoder_ranks_the_answer_first(client):
    result = client.rerank(QUERY, DOCUMENTS, return_documents=True)
    assert result.results[0].index == 1
    assert result.results[0].document == DOCUMENTS[1]
    assert all(r.document == DOCUMENTS[r.index] for r in result.results)
    assert_sorted_stably(result)
    assert scores_by_index(result)[3] == pytest.approx((float(np.dot(minilm_embeddings([""])[0], minilm_embeddings([QUERY])[0])) + 1) / 2, abs=1e-4)
    tokens = [len(ids) for ids in _minilm_ids([QUERY, *DOCUMENTS])]
    assert result.usage.prompt_tokens == sum(tokens)


def _minilm_ids(texts):
    from reference import _minilm

    tokenizer, _ = _minilm("right")
    return tokenizer(texts)["input_ids"]


@pytest.mark.parametrize("model", [None, "cross"])
def test_top_n_and_documents_off_by_default(client, cross_name, model):
    model = cross_name if model == "cross" else None
    full = client.rerank(QUERY, DOCUMENTS, model=model)
    top = client.rerank(QUERY, DOCUMENTS, model=model, top_n=3)
    assert [(r.index, r.score) for r in top.results] == [(r.index, r.score) for r in full.results[:3]]
    assert all(r.document is None for r in full.results)
    assert len(client.rerank(QUERY, DOCUMENTS, model=model, top_n=100).results) == len(DOCUMENTS)
    assert top.usage == full.usage


@pytest.mark.parametrize("model", [None, "cross"])
def test_ties_keep_request_order(client, cross_name, model):
    model = cross_name if model == "cross" else None
    a, b = "Paris is the capital of France.", "Bananas are yellow."
    # Duplicates far apart land in different Triton chunks: they must still tie exactly.
    documents = [b, a, b, a, *[f"filler text {i}" for i in range(100)], a, b]
    result = client.rerank(QUERY, documents, model=model)
    by_text: dict[str, list[ragserve.RankedDocument]] = {}
    for r in result.results:
        by_text.setdefault(documents[r.index], []).append(r)
    for text in (a, b):
        group = by_text[text]
        assert len({r.score for r in group}) == 1
        assert [r.index for r in group] == sorted(r.index for r in group)
    positions = [r.index for r in result.results]
    for text in (a, b):  # equal scores are also adjacent, in request order
        indices = [i for i, d in enumerate(documents) if d == text]
        start = positions.index(indices[0])
        assert positions[start : start + len(indices)] == indices
    assert_sorted_stably(result)


def test_1000_documents_bi_encoder(client):
    documents = [f"passage {i} about topic {i % 13}: " + "lorem ipsum " * (i % 5) for i in range(1000)]
    result = client.rerank("topic 7", documents, top_n=1000)
    assert sorted(r.index for r in result.results) == list(range(1000))
    assert_sorted_stably(result)
    sample = [0, 7, 500, 999]
    want = minilm_embeddings([documents[i] for i in sample]) @ minilm_embeddings(["topic 7"])[0]
    np.testing.assert_allclose(scores_by_index(result)[sample], (want + 1) / 2, atol=1e-4)


async def test_async_client_reranks(rerank_gateway, cross_name):
    async with ragserve.AsyncClient(rerank_gateway.address, timeout=60) as aclient:
        result = await aclient.rerank(QUERY, DOCUMENTS, model=cross_name, top_n=2, return_documents=True)
    assert len(result.results) == 2
    assert result.results[0].document == DOCUMENTS[result.results[0].index]


def test_list_models_reports_rerankers_with_their_kind(client, cross_name):
    models = {m.name: m for m in client.list_models()}
    assert models[BI_ENCODER].kind == "bi_encoder"
    assert models[BI_ENCODER].is_default
    assert models[BI_ENCODER].max_batch == 1000
    assert models[cross_name].kind == "cross_encoder"
    assert not models[cross_name].is_default
    assert models[cross_name].max_input_tokens == 512
    assert [m.name for m in models.values() if m.is_default and m.kind != "embedding"] == [BI_ENCODER]


# --- bad input: a clear INVALID_ARGUMENT (or NOT_FOUND), and the server goes on serving ------

LONG_QUERY = " ".join(["question"] * 300)  # 302 tokens: over the bi-encoder's 256
LONGER_QUERY = " ".join(["question"] * 520)  # over the cross-encoder's 512

BAD_INPUTS = [
    (dict(query="", documents=["a"]), ragserve.InvalidArgumentError, "query is empty"),
    (dict(query="   ", documents=["a"]), ragserve.InvalidArgumentError, "query is empty"),
    (dict(query="q", documents=[]), ragserve.InvalidArgumentError, "documents is empty"),
    (dict(query="q", documents=["d"] * 1001), ragserve.InvalidArgumentError, "too many documents: 1001 > 1000"),
    (dict(query="q", documents=["d"], top_n=0), ragserve.InvalidArgumentError, "top_n must be at least 1"),
    (dict(query=LONG_QUERY, documents=["d"]), ragserve.InvalidArgumentError, "query has 302 tokens, more than the 256"),
    (dict(query=LONG_QUERY, documents=["d"], truncate="end"), ragserve.InvalidArgumentError, "queries are never truncated"),
    (dict(query="q", documents=["ok", "fine", LONG]), ragserve.InvalidArgumentError, "document 2 has"),
    (dict(query="q", documents=["ok", LONG], truncate="none"), ragserve.InvalidArgumentError, "document 1 has"),
    (dict(query="q", documents=["d"], model="no-such-model"), ragserve.ModelNotFoundError, "unknown model 'no-such-model'"),
    (
        dict(query="q", documents=["d"], model="all-minilm-l6-v2"),
        ragserve.InvalidArgumentError,
        "model 'all-minilm-l6-v2' is an embedding model, not a reranker; rerankers: all-minilm-l6-v2-bi-encoder",
    ),
    # The cross-encoder's limit is on the pair: the query must leave room for the document.
    (dict(query=LONGER_QUERY, documents=["d"], model="cross"), ragserve.InvalidArgumentError, "than the 510 allowed"),
    (dict(query="q", documents=["ok", LONG], model="cross"), ragserve.InvalidArgumentError, "document 1 with the query has"),
    (dict(query="q", documents=["d"] * 1001, model="cross"), ragserve.InvalidArgumentError, "too many documents"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD_INPUTS)])
def test_bad_input_is_rejected_clearly(client, cross_name, kwargs, error, message):
    kwargs = dict(kwargs)
    if kwargs.get("model") == "cross":
        kwargs["model"] = cross_name
    with pytest.raises(error) as info:
        client.rerank(kwargs.pop("query"), kwargs.pop("documents"), **kwargs)
    assert message in info.value.message
    assert info.value.request_id
    assert client.rerank("still serving?", ["yes", "no"]).results
    assert client.rerank("still serving?", ["yes", "no"], model=cross_name).results


def test_sdk_rejects_a_single_string_as_documents(client):
    with pytest.raises(ragserve.InvalidArgumentError, match="sequence of str"):
        client.rerank("q", "one document")


# --- long documents: chunked and scored by their best chunk -----------------------------------


def test_bi_encoder_scores_a_long_document_by_its_best_chunk(client):
    """The answer buried past the model's 256 tokens: truncation loses it, chunking finds it."""
    filler = "Photosynthesis turns light, water and carbon dioxide into sugar. " * 30  # ~330 tokens
    answer = "Paris is the capital and most populous city of France."
    documents = [filler + answer, "Berlin is the capital and largest city of Germany."]
    truncated = client.rerank(QUERY, documents, truncate="end")
    chunked = client.rerank(QUERY, documents, chunk_long_documents=True, raw_scores=True, return_documents=True)
    assert truncated.results[0].index == 1 and chunked.results[0].index == 0
    best = chunked.results[0]
    assert best.chunk_index == 1 and best.document == documents[0]
    assert [r.chunk_index for r in chunked.results if r.index == 1] == [0]
    # The best chunk's score is the score of that chunk alone (the tail of the document).
    tail = client.rerank(QUERY, [documents[0][-400:]]).results[0]
    assert best.relevance_score == pytest.approx((best.raw_score + 1) / 2, abs=1e-6)
    assert best.relevance_score >= tail.relevance_score - 0.05
    with pytest.raises(ragserve.InvalidArgumentError, match="more than the model's limit"):
        client.rerank(QUERY, documents)  # without chunking or truncation: refused, as before


def test_cross_encoder_scores_a_long_document_by_its_best_chunk(client, cross_encoder):
    documents = [LONG + " Paris is the capital of France.", "short one"]
    result = client.rerank(QUERY, documents, model=cross_encoder.name, chunk_long_documents=True, raw_scores=True)
    by_index = {r.index: r for r in result.results}
    assert by_index[0].chunk_index is not None and by_index[1].chunk_index == 0
    assert by_index[1].raw_score == pytest.approx(float(cross_encoder_logits(cross_encoder.hf_folder, QUERY, ["short one"])[0]), abs=1e-4)
    # Every chunk fits beside the query: the usage counts more than one model-sized pair.
    assert result.usage.prompt_tokens > 512


def model_rows(triton, model: str) -> int:
    """Rows `model` has computed in Triton so far (its inference count)."""
    stats = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


def test_identical_documents_are_scored_once(client, cross_encoder, triton):
    """Rows Triton computed for a call with duplicates: one per distinct document (and for the
    bi-encoder one more for the query), seen in Triton's own statistics."""
    distinct = [f"identical documents test {i}: rivers flow to the sea" for i in range(3)]
    documents = distinct * 4 + distinct[:1] * 5  # 17 documents, 3 distinct
    # Triton counts a request's rows when it releases the request, which can be just after the
    # answer reached us: wait for the rows to be counted (a Triton request's rows count at once,
    # so 17 rows computed would show as 17, never as 3 on the way).
    before = model_rows(triton, cross_encoder.model_dir.name)
    crossed = client.rerank(QUERY, documents, model=cross_encoder.name)
    rows = counted(lambda: model_rows(triton, cross_encoder.model_dir.name) - before, len(distinct), "the cross-encoder's rows counted")
    assert rows == len(distinct)
    before = model_rows(triton, "minilm")
    bi = client.rerank(QUERY, documents, model=BI_ENCODER)
    rows = counted(lambda: model_rows(triton, "minilm") - before, len(distinct), "the bi-encoder's rows counted")
    assert rows <= len(distinct) + 1  # (+ the query)
    for result in (crossed, bi):
        scores = scores_by_index(result)
        for text in distinct:  # duplicates share their one score
            assert len({float(scores[i]) for i, d in enumerate(documents) if d == text}) == 1
