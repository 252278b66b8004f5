"""The LLM rerankers' gateway side (services/rerank_llm.py) over a fake generation model that
answers scoring requests from the prompt it is sent: the sliding window's passes, scores that
follow the order, the pointwise score, the registry entries' checks, and bad input refused
before any model call. The numbers against transformers: tests/test_rerank_llm_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ragserve.v1 import common_pb2, rerank_pb2
from ragserve_server.errors import InvalidInput
from ragserve_server.models.builtin import builtin_specs
from ragserve_server.models.catalog import LLM_RERANKER, build_catalog
from ragserve_server.models.llm_rerankers import LlmReranker, smollm2_rerankers
from ragserve_server.services.rerank import RerankService
from ragserve_server.services.rerank_llm import LlmRerankers
from support import MODEL_REPOSITORY, unavailable

if not (MODEL_REPOSITORY / "smollm2" / "1" / "hf" / "tokenizer.json").is_file():
    unavailable("SmolLM2's folder is not built (make models)", allow_module_level=True)

LABELS = "ABCDEFGHIJKLMNOPQRST"


class ScoringBackend:
    """Answers `candidate_token_ids` requests: listwise, each label's logit is the hidden
    relevance of the document "doc<N>" shown with it; pointwise, (N / 10, 0) for "doc<N>"."""

    def __init__(self, tokenizer, relevance: dict[int, float]) -> None:
        self.tokenizer, self.relevance = tokenizer, relevance
        self.prompts: list[str] = []

    async def stream(self, model, inputs, outputs, *, timeout, priority=0):
        text = self.tokenizer.decode(inputs["input_ids"][0].tolist())
        self.prompts.append(text)
        n = inputs["candidate_token_ids"].shape[1]
        shown = dict(re.findall(r"\[([A-T])\] doc(\d+)", text))
        if shown:
            logits = [self.relevance[int(shown[label])] for label in LABELS[:n]]
        else:
            (number,) = re.findall(r"Document: doc(\d+)", text)
            logits = [int(number) / 10, 0.0]
        yield {
            "output_ids": np.zeros((1, 1, 0), np.int32),
            "sequence_length": np.zeros((1, 1), np.int32),
            "candidate_logits": np.array([logits], np.float32),
        }, True


@pytest.fixture(scope="module")
def catalog():
    return build_catalog(builtin_specs(MODEL_REPOSITORY, ["smollm2"]))


def service(catalog, relevance):
    models = catalog.by_kind(LLM_RERANKER)
    llm = LlmRerankers(models, None, ThreadPoolExecutor(2))
    backend = ScoringBackend(llm.builders[models[0].name].hf, relevance)
    llm.backend = backend
    return RerankService(catalog, {}, None, ThreadPoolExecutor(2), 1000, llm=llm), backend


def rerank(svc, model, documents, **fields):
    request = rerank_pb2.RerankRequest(model=model, query="which doc is best?", documents=documents, raw_scores=True, **fields)
    return asyncio.run(svc.rerank(request, timeout=None))


def sliding_window(relevance: list[float], window: int, stride: int) -> list[int]:
    """RankGPT's / FIRST's passes, written out: each window sorted by relevance (stable)."""
    order = list(range(len(relevance)))
    end, start = len(order), max(0, len(order) - window)
    while True:
        order[start:end] = sorted(order[start:end], key=lambda i: -relevance[i])
        if start == 0:
            return order
        end -= stride
        start = max(0, end - window)


@pytest.mark.parametrize("n", [1, 7, 20, 21, 45, 100])
def test_listwise_sliding_window_order_and_scores(catalog, n):
    rng = np.random.default_rng(n)
    hidden = {i: float(v) for i, v in enumerate(rng.permutation(n))}
    svc, backend = service(catalog, hidden)
    response = rerank(svc, "smollm2-listwise", [f"doc{i}" for i in range(n)])
    order = [r.index for r in response.results]
    assert order == sliding_window([hidden[i] for i in range(n)], 20, 10)
    passes = 1 if n <= 20 else 1 + -(-(n - 20) // 10)
    assert len(backend.prompts) == passes
    # The best `stride` documents always reach the top (what the sliding window guarantees).
    assert sorted(order[:10]) == sorted(sorted(range(n), key=lambda i: -hidden[i])[:10])
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == n
    assert scores[0] == 1.0 and scores[-1] == pytest.approx(1 / n)
    if n <= 20:  # one window: the raw scores are the identifier logits themselves
        assert [r.raw_score for r in response.results] == sorted((hidden[i] for i in range(n)), reverse=True)


def test_pointwise_score_is_the_yes_no_difference(catalog):
    svc, backend = service(catalog, {})
    response = rerank(svc, "smollm2-pointwise", ["doc3", "doc25", "doc-0"[:3] + "0", "doc11"])
    assert [r.index for r in response.results] == [1, 3, 0, 2]
    for r in response.results:
        raw = [0.3, 2.5, 0.0, 1.1][r.index]
        assert r.raw_score == pytest.approx(raw, abs=1e-6)
        assert r.relevance_score == pytest.approx(1 / (1 + np.exp(-raw)), abs=1e-6)
    assert len(backend.prompts) == 4 and "Does the document answer the query? Answer Yes or No." in backend.prompts[0]


def test_a_failed_scoring_request_fails_the_call_with_its_own_error(catalog):
    from ragserve_server.errors import Overloaded

    svc, backend = service(catalog, {})
    calls = []

    async def refuse_the_third(model, inputs, outputs, *, timeout, priority=0):
        calls.append(1)
        if len(calls) == 3:
            raise Overloaded("scoring queue is full")
        async for item in ScoringBackend.stream(backend, model, inputs, outputs, timeout=timeout):
            yield item

    svc.llm.backend = type("Refusing", (), {"stream": staticmethod(refuse_the_third)})()
    with pytest.raises(Overloaded, match="scoring queue is full"):
        rerank(svc, "smollm2-pointwise", [f"doc{i}" for i in range(5)])


@pytest.mark.parametrize(
    "model, documents, fields, message",
    [
        ("smollm2-listwise", [f"doc{i}" for i in range(101)], {}, "too many documents"),
        ("smollm2-listwise", ["doc1", "doc2"], {"chunk_long_documents": True}, "chunk_long_documents"),
        ("smollm2-listwise", ["doc1", "word " * 200], {}, "document 1 has"),
        ("smollm2-pointwise", ["doc1", "word " * 2000], {}, "truncate"),
    ],
)
def test_bad_input_is_invalid_argument_before_any_model_call(catalog, model, documents, fields, message):
    svc, backend = service(catalog, {i: 0.0 for i in range(200)})
    with pytest.raises(InvalidInput, match=message):
        rerank(svc, model, documents, **fields)
    assert backend.prompts == []


def test_truncate_end_cuts_a_long_passage_to_its_limit(catalog):
    svc, backend = service(catalog, {1: 1.0, 2: 0.0})
    response = rerank(svc, "smollm2-listwise", ["doc2 " + "word " * 200, "doc1"], truncate=common_pb2.TRUNCATE_END)
    assert [r.index for r in response.results] == [1, 0]
    doc = len(backend.tokenizer("doc2", add_special_tokens=False)["input_ids"])
    assert backend.prompts[0].count("word") == 80 - doc  # "doc2" + words up to the 80 tokens a passage may have


def test_registry_entries_are_checked():
    pointwise, listwise = smollm2_rerankers()
    for reranker in smollm2_rerankers():
        reranker.validate(2048)
    bad = [
        dataclasses.replace(listwise, window=21),  # more passages than labels
        dataclasses.replace(listwise, stride=0),
        dataclasses.replace(listwise, max_document_tokens=200),  # 20 x 200 tokens over the context
        dataclasses.replace(pointwise, candidates=("Yes",)),
        dataclasses.replace(pointwise, user="{query} only"),
        dataclasses.replace(listwise, method="pairwise"),
    ]
    for reranker in bad:
        with pytest.raises(ValueError, match=reranker.name):
            reranker.validate(2048)


def test_candidates_must_be_single_tokens_after_the_prompt(catalog):
    model = next(m for m in catalog.by_kind(LLM_RERANKER) if m.name == "smollm2-pointwise")
    broken = dataclasses.replace(model, llm_reranker=dataclasses.replace(model.llm_reranker, candidates=("Yes indeed", "No")))
    with pytest.raises(ValueError, match="not a single token"):
        LlmRerankers([broken], None, ThreadPoolExecutor(1))
    assert isinstance(model.llm_reranker, LlmReranker)


def test_make_run_serves_both_llm_rerankers_by_default():
    from ragserve_server.settings import Settings

    names = [n.strip() for n in Settings().triton_models.split(",")]
    catalog = build_catalog(builtin_specs(MODEL_REPOSITORY, names))
    for name in ("smollm2-pointwise", "smollm2-listwise"):
        model = catalog.get(name, (LLM_RERANKER,))
        assert model.triton_model == "smollm2" and model.llm_reranker.name == name
    assert catalog.defaults["bi_encoder"] == "all-minilm-l6-v2-bi-encoder"  # the default reranker is unchanged
