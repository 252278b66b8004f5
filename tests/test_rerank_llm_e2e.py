"""The LLM rerankers end to end: SmolLM2 in the real Triton (the engine's prefill-only scoring)
behind the real gateway, over gRPC Rerank and HTTP /v1/rerank, against transformers' own
forward pass on the same folder with the prompts built here from the registry entries:
pointwise yes/no logit differences within 1e-3, FIRST's order equal to the order of the
identifier logits computed directly (a sliding window over a list longer than the window too)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import grpc
import pytest

import ragserve
from ragserve_server.models.llm_rerankers import POINTWISE, smollm2_rerankers
from support import MODEL_REPOSITORY, GatewayProcess, free_port, start_triton

pytestmark = pytest.mark.integration

HF = MODEL_REPOSITORY / "smollm2" / "1" / "hf"
QUERY = "what is the capital of australia"
DOCUMENTS = [
    "Canberra is the capital city of Australia, chosen as a compromise between Sydney and Melbourne.",
    "The Australian Capital Territory contains the seat of the federal government.",
    "Vienna is the capital of Austria, not to be confused with Australia.",
    "Kangaroos and koalas are native to the Australian continent.",
    "Sydney is the largest city in Australia and home to its famous opera house.",
]
# 26 documents: two windows of 20 (positions 6-25, then 0-15).
LONG = DOCUMENTS + [f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'} and it follows {i - 1}." for i in range(21)]
ENTRIES = {r.name: r for r in smollm2_rerankers()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("llm_rerank")
    triton = start_triton(work, ["smollm2"])
    try:
        http_port = free_port()
        gateway = GatewayProcess(triton.grpc_url, ["smollm2"], work / "gateway.log", "--http-port", str(http_port))
        gateway.wait_serving(timeout=120)
        try:
            yield gateway, f"http://127.0.0.1:{http_port}"
        finally:
            gateway.stop()
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def reference():
    """transformers on SmolLM2's folder: the next-token logits after a reranker's prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HF)
    model = AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float32).eval()

    def prompt(entry, content: str) -> list[int]:
        messages = ([{"role": "system", "content": entry.system}] if entry.system is not None else []) + [
            {"role": "user", "content": content}
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + entry.assistant_prefix
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def candidates(entry, count: int) -> list[int]:
        ids = [tokenizer.convert_tokens_to_ids(c) for c in entry.candidates[:count]]
        assert all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids)
        return ids

    def logits(entry, content: str, count: int) -> list[float]:
        with torch.no_grad():
            out = model(torch.tensor([prompt(entry, content)])).logits[0, -1]
        return out[candidates(entry, count)].tolist()

    def pointwise(entry, query: str, documents: list[str]) -> list[float]:
        assert entry.method == POINTWISE
        diffs = []
        for d in documents:
            yes, no = logits(entry, entry.user.format(query=query, document=d), 2)
            diffs.append(yes - no)
        return diffs

    def listwise(entry, query: str, documents: list[str]) -> list[int]:
        """FIRST's order with RankGPT's sliding window, each window ordered by its identifier logits."""
        order = list(range(len(documents)))
        end, start = len(order), max(0, len(order) - entry.window)
        while True:
            window = order[start:end]
            passages = "".join(entry.passage.format(label=entry.candidates[j], passage=documents[i]) for j, i in enumerate(window))
            values = logits(entry, entry.user.format(query=query, num=len(window), passages=passages), len(window))
            order[start:end] = [window[j] for j in sorted(range(len(window)), key=lambda j: -values[j])]
            if start == 0:
                return order
            end -= entry.stride
            start = max(0, end - entry.window)

    return pointwise, listwise


def post(base: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/v1/rerank", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_pointwise_equals_transformers_over_grpc_and_http(stack, reference):
    gateway, base = stack
    pointwise, _ = reference
    expected = pointwise(ENTRIES["smollm2-pointwise"], QUERY, DOCUMENTS)
    with ragserve.Client(gateway.address, timeout=300) as client:
        result = client.rerank(QUERY, DOCUMENTS, model="smollm2-pointwise", raw_scores=True)
    assert result.model == "smollm2-pointwise" and sorted(r.index for r in result.results) == list(range(len(DOCUMENTS)))
    for r in result.results:
        assert abs(r.raw_score - expected[r.index]) < 1e-3
    assert [r.index for r in result.results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    status, body = post(base, {"model": "smollm2-pointwise", "query": QUERY, "documents": DOCUMENTS})
    assert status == 200 and [r["index"] for r in body["results"]] == [r.index for r in result.results]
    for item in body["results"]:  # sigmoid of the difference (batches differ: float rounding apart)
        assert abs(item["relevance_score"] - 1 / (1 + math.exp(-expected[item["index"]]))) < 1e-4


@pytest.mark.parametrize("documents", [DOCUMENTS, LONG], ids=["one-window", "sliding-window"])
def test_listwise_order_equals_the_identifier_logits_over_grpc_and_http(stack, reference, documents):
    gateway, base = stack
    _, listwise = reference
    expected = listwise(ENTRIES["smollm2-listwise"], QUERY, documents)
    with ragserve.Client(gateway.address, timeout=300) as client:
        result = client.rerank(QUERY, documents, model="smollm2-listwise")
    assert [r.index for r in result.results] == expected
    scores = [r.relevance_score for r in result.results]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    status, body = post(base, {"model": "smollm2-listwise", "query": QUERY, "documents": documents, "top_n": 3})
    assert status == 200 and [r["index"] for r in body["results"]] == expected[:3]


def test_bad_input_is_invalid_argument(stack):
    gateway, base = stack
    too_many = [f"document {i}" for i in range(101)]
    with ragserve.Client(gateway.address, timeout=120) as client:
        for kwargs in ({"model": "smollm2-listwise"}, {"model": "smollm2-listwise", "chunk_long_documents": True}):
            documents = too_many if "chunk_long_documents" not in kwargs else DOCUMENTS
            with pytest.raises(ragserve.RagserveError) as info:
                client.rerank(QUERY, documents, **kwargs)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ragserve.RagserveError) as info:
            client.rerank(QUERY, ["word " * 300], model="smollm2-listwise")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "truncate" in str(info.value)
        names = {m.name for m in client.list_models()}
    assert {"smollm2-pointwise", "smollm2-listwise"} <= names
    status, body = post(base, {"model": "smollm2-listwise", "query": QUERY, "documents": too_many})
    assert status == 400 and "too many documents" in json.dumps(body)
