"""The HTTP front against the real stack, through clients nobody here wrote: the official
`openai` package (embeddings float and base64, chat completions streamed and not,
completions, models) and plain HTTP (httpx) for rerank. Answers equal the gRPC answers for
the same inputs; errors take OpenAI's shape and status; keys and overload as over gRPC."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as triton_grpc
from prometheus_client.parser import text_string_to_metric_families

import ragserve
from ragserve.v1 import rerank_pb2, rerank_pb2_grpc
from ragserve_server.transport.openai_shapes import _SCORE as SCORE_FIELD
from ragserve_server.security.keys import key_line, new_key
from ragserve_server.models.builtin import smollm2_spec
from support import MODEL_REPOSITORY, GatewayProcess, free_port, metric_value, start_triton, unavailable, wait_until
from ragserve_server.supervision.triton_launcher import TritonServer

pytestmark = pytest.mark.integration

EMBEDDER = "all-minilm-l6-v2"
GENERATOR = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name the capital of France."}]
TOLERANCE = 1e-6
SENTENCES = ["The capital of France is Paris.", "Rivers flow to the sea.", "héllo wörld 👋"]


class HttpGateway(GatewayProcess):
    def __init__(self, triton, models: list[str], log_path, *extra: str, metrics_port: int = 0) -> None:
        self.http_port = free_port()
        super().__init__(triton.grpc_url, models, log_path, "--http-port", str(self.http_port), *extra, metrics_port=metrics_port)
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    def openai(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One Triton with MiniLM and SmolLM2; a gateway serving both over gRPC and HTTP (greedy,
    short generations keep it fast)."""
    if smollm2_spec(MODEL_REPOSITORY).missing_artifacts(MODEL_REPOSITORY):
        unavailable("SmolLM2 is not built: `make models`")
    work = tmp_path_factory.mktemp("http_stack")
    triton = start_triton(work, ["minilm", "smollm2"])
    gateway = HttpGateway(triton, ["minilm", "smollm2"], work / "gateway.log", metrics_port=free_port())
    try:
        gateway.wait_serving(timeout=120)
        yield triton, gateway
    finally:
        gateway.stop()
        triton.stop()


@pytest.fixture(scope="module")
def grpc_client(stack):
    _, gateway = stack
    with ragserve.Client(gateway.address, timeout=120) as client:
        yield client


# -- embeddings ---------------------------------------------------------------------------


def test_embeddings_float_and_base64_equal_grpc(stack, grpc_client):
    _, gateway = stack
    expected = grpc_client.embed(SENTENCES)
    client = gateway.openai()
    as_float = client.embeddings.create(input=SENTENCES, model=EMBEDDER, encoding_format="float")
    as_base64 = client.embeddings.create(input=SENTENCES, model=EMBEDDER)  # the openai client asks for base64 itself
    for answer in (as_float, as_base64):
        assert [d.index for d in answer.data] == [0, 1, 2]
        got = np.asarray([d.embedding for d in answer.data], dtype=np.float32)
        # Equal up to float noise: Triton's dynamic batcher may run the call's length buckets
        # together or apart, and ONNX Runtime's sums differ in the last bits between batch shapes.
        np.testing.assert_allclose(got, expected.embeddings, rtol=0, atol=TOLERANCE)
        assert answer.model == EMBEDDER
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == expected.usage.prompt_tokens

    raw = httpx.post(gateway.base_url + "/v1/embeddings", json={"input": SENTENCES[0], "model": EMBEDDER, "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, expected.embeddings[0], rtol=0, atol=TOLERANCE)
    assert raw.headers["x-request-id"]


def test_embeddings_dimensions_equal_grpc(stack, grpc_client):
    _, gateway = stack
    expected = grpc_client.embed(SENTENCES[0], dimensions=64)
    answer = gateway.openai().embeddings.create(input=SENTENCES[0], model=EMBEDDER, dimensions=64, encoding_format="float")
    np.testing.assert_allclose(np.asarray(answer.data[0].embedding, dtype=np.float32), expected.embeddings[0], rtol=0, atol=TOLERANCE)


# -- generation ---------------------------------------------------------------------------


def test_chat_completion_equals_grpc(stack, grpc_client):
    _, gateway = stack
    expected = grpc_client.generate(messages=MESSAGES, max_tokens=12, temperature=0)
    answer = gateway.openai().chat.completions.create(model=GENERATOR, messages=MESSAGES, max_tokens=12, temperature=0)
    assert answer.object == "chat.completion" and answer.model == GENERATOR
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text and expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    assert answer.usage.completion_tokens == expected.usage.completion_tokens


def test_chat_completion_streamed_equals_grpc_with_usage_last(stack, grpc_client):
    _, gateway = stack
    expected = grpc_client.generate(messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        gateway.openai().chat.completions.create(
            model=GENERATOR, messages=MESSAGES, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == expected.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_server_sent_events_ending_with_done(stack):
    _, gateway = stack
    body = {"model": GENERATOR, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway.base_url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:]) or json.loads(events[-2][6:])["usage"] is None


def test_completions_equal_grpc_whole_and_streamed(stack, grpc_client):
    _, gateway = stack
    prompt = "The three primary colours are"
    expected = grpc_client.generate(prompt=prompt, max_tokens=10, temperature=0, stop=["\n\n"])
    client = gateway.openai()
    answer = client.completions.create(model=GENERATOR, prompt=prompt, max_tokens=10, temperature=0, stop=["\n\n"])
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected.text and answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.completion_tokens == expected.usage.completion_tokens
    chunks = list(client.completions.create(model=GENERATOR, prompt=prompt, max_tokens=10, temperature=0, stop=["\n\n"], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text


def test_models_list_equals_grpc(stack, grpc_client):
    _, gateway = stack
    listed = gateway.openai().models.list()
    assert [m.id for m in listed.data] == [m.name for m in grpc_client.list_models()]
    assert {EMBEDDER, GENERATOR} <= {m.id for m in listed.data}
    assert all(m.object == "model" and m.owned_by == "ragserve" for m in listed.data)
    # Read from the catalog, not through the gRPC handler: the same limits and defaults, and each
    # kind by the registry's name (the LLM rerankers, a cross-encoder over gRPC, say so here).
    infos = {m.name: m for m in grpc_client.list_models()}
    for m in listed.data:
        extra = m.model_extra or {}
        assert (extra["max_input_tokens"], extra["is_default"]) == (infos[m.id].max_input_tokens, infos[m.id].is_default), m.id
        assert extra["dimensions"] == (infos[m.id].dimensions or None), m.id
        expected_kind = "llm_reranker" if m.id in ("smollm2-pointwise", "smollm2-listwise") else infos[m.id].kind
        assert extra["kind"] == expected_kind, m.id


# -- rerank (plain HTTP, the Cohere / Jina shape) -------------------------------------------


def test_rerank_over_http_equals_grpc(stack):
    _, gateway = stack
    query = "What is the capital of France?"
    documents = ["Berlin is the capital of Germany.", "Paris is the capital of France.", "Bananas are yellow."]
    with grpc.insecure_channel(gateway.address) as channel:  # the proto itself: what the SDK wraps
        expected = rerank_pb2_grpc.RerankStub(channel).Rerank(
            rerank_pb2.RerankRequest(query=query, documents=documents, top_n=2, return_documents=True), timeout=60
        )
    body = {"query": query, "documents": [documents[0], {"text": documents[1]}, documents[2]], "top_n": 2, "return_documents": True}
    response = httpx.post(gateway.base_url + "/v1/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == expected.model
    assert [r["index"] for r in answer["results"]] == [r.index for r in expected.results] == [1, 0]
    scores = [getattr(r, SCORE_FIELD) for r in expected.results]
    np.testing.assert_allclose([r["relevance_score"] for r in answer["results"]], scores, rtol=0, atol=TOLERANCE)
    assert [r["document"]["text"] for r in answer["results"]] == [documents[1], documents[0]]
    assert answer["usage"]["total_tokens"] == expected.usage.prompt_tokens
    bare = httpx.post(gateway.base_url + "/v1/rerank", json={"query": query, "documents": documents}, timeout=60).json()
    assert len(bare["results"]) == 3 and "document" not in bare["results"][0]


# -- errors, metrics, health ----------------------------------------------------------------


def _error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    return error


def test_errors_take_openais_shape_and_status(stack):
    _, gateway = stack
    url = gateway.base_url
    assert "empty" in _error(httpx.post(url + "/v1/embeddings", json={"input": [], "model": EMBEDDER}), 400, "invalid_request_error")["message"]
    assert _error(httpx.post(url + "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_request_error")["code"] == "invalid_input"
    assert _error(httpx.post(url + "/v1/embeddings", json={"input": "x", "model": "nope"}), 404, "not_found_error")["code"] == "model_not_found"
    n2 = httpx.post(url + "/v1/chat/completions", json={"model": GENERATOR, "messages": MESSAGES, "n": 2})
    assert "n must be 1" in _error(n2, 400, "invalid_request_error")["message"]
    _error(httpx.post(url + "/v1/rerank", json={"query": "q", "documents": []}), 400, "invalid_request_error")
    _error(httpx.get(url + "/v1/nothing"), 404, "not_found_error")
    # the caller's request id comes back
    assert httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"x-request-id": "req-42"}).headers["x-request-id"] == "req-42"
    # ... up to 128 plain characters; a longer or marked-up one is replaced (the call is still served)
    for sent, kept in (("a" * 128, True), ("a" * 129, False), ("x" * 8000, False), ("id <script>", False)):
        reply = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"x-request-id": sent})
        assert reply.status_code == 200 and (reply.headers["x-request-id"] == sent) is kept
        assert 0 < len(reply.headers["x-request-id"]) <= 128

    client = gateway.openai(max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(input=[""], model=EMBEDDER)
    assert bad.value.status_code == 400 and "empty" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=GENERATOR, messages=MESSAGES, n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_http_calls_are_counted_with_the_grpc_labels(stack):
    _, gateway = stack

    def count(**labels) -> float:
        text = httpx.get(gateway.metrics_url).text
        return sum(
            s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "ragserve_requests_total" and all(s.labels.get(k) == v for k, v in labels.items())
        )

    before = count(service="Embed", method="Embed", code="OK"), count(service="Embed", method="Embed", code="INVALID_ARGUMENT")
    assert httpx.post(gateway.base_url + "/v1/embeddings", json={"input": "counted"}).status_code == 200
    assert httpx.post(gateway.base_url + "/v1/embeddings", json={"input": ""}).status_code == 400
    after = count(service="Embed", method="Embed", code="OK"), count(service="Embed", method="Embed", code="INVALID_ARGUMENT")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_health(stack):
    _, gateway = stack
    response = httpx.get(gateway.base_url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "serving"}


def test_token_arrays_are_refused_with_400(stack):
    _, gateway = stack
    url = gateway.base_url
    for tokens in ([101, 2054, 102], [[101, 2054], [101, 102]]):
        refused = httpx.post(url + "/v1/embeddings", json={"input": tokens, "model": EMBEDDER})
        assert "token arrays are not accepted" in _error(refused, 400, "invalid_request_error")["message"]
    refused = httpx.post(url + "/v1/completions", json={"prompt": [[1, 2, 3]], "model": GENERATOR, "max_tokens": 2})
    assert "prompt must be a string" in _error(refused, 400, "invalid_request_error")["message"]
    refused = httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "model": GENERATOR, "max_tokens": 2})
    _error(refused, 400, "invalid_request_error")


def test_max_completion_tokens_bounds_the_answer_and_wins_over_max_tokens(stack):
    _, gateway = stack
    client = gateway.openai()
    for kwargs in (dict(max_completion_tokens=3), dict(max_completion_tokens=3, max_tokens=12)):
        answer = client.chat.completions.create(model=GENERATOR, messages=MESSAGES, temperature=0, **kwargs)
        assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length", kwargs
    longer = client.chat.completions.create(model=GENERATOR, messages=MESSAGES, temperature=0, max_tokens=5)
    assert longer.usage.completion_tokens == 5


def test_logprobs_are_refused_with_400_not_dropped(stack):
    """The HTTP front does not render logprobs (the gRPC API does): asking for them is a 400
    naming the field, on chat and completions alike, instead of an answer without them."""
    _, gateway = stack
    url = gateway.base_url
    for path, body in (
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True}),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}),
        ("/v1/completions", {"prompt": "Paris is", "logprobs": 2}),
        ("/v1/completions", {"prompt": "Paris is", "logprobs": 0}),
    ):
        refused = httpx.post(url + path, json={"model": GENERATOR, "max_tokens": 2, **body}, timeout=60)
        error = _error(refused, 400, "invalid_request_error")
        assert "not supported over HTTP" in error["message"] and ("logprobs" in error["message"]), (path, body)
    # Off is off: `logprobs: false` is served.
    served = httpx.post(url + "/v1/chat/completions", json={"model": GENERATOR, "messages": MESSAGES, "max_tokens": 2, "logprobs": False}, timeout=60)
    assert served.status_code == 200, served.text


def test_a_client_that_disconnects_cancels_the_engines_work(stack):
    triton, gateway = stack

    def engine(name: str) -> float:
        return metric_value(triton.metrics_url, name)

    wait_until(lambda: engine("ragserve_engine_running_sequences") == 0, 60, "an idle engine")
    body = {"model": GENERATOR, "prompt": "Count from one to one thousand:", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            wait_until(lambda: engine("ragserve_engine_running_sequences") == 1, 60, "the sequence running")
            left_at = engine("ragserve_engine_generated_tokens_total")
        # The connection is closed here, mid-stream.
    wait_until(lambda: engine("ragserve_engine_running_sequences") == 0, 60, "the engine dropping the sequence")
    assert engine("ragserve_engine_generated_tokens_total") - left_at < 200  # not run on to 1000 tokens


def test_health_is_503_while_triton_is_down_and_a_draining_gateway_finishes_its_calls(tmp_path):
    """A gateway of its own: /health answers 503 while its Triton is down and 200 once it is
    back; on SIGTERM an HTTP call in flight still completes and /health never answers 200
    again (uvicorn closes the listener as the drain starts: 503 or a refused connection)."""
    triton = start_triton(tmp_path / "triton", ["minilm"])
    gateway = HttpGateway(triton, ["minilm"], tmp_path / "gateway.log", "--drain-seconds", "60")
    try:
        gateway.wait_serving(timeout=120)

        def health() -> int | None:
            try:
                return httpx.get(gateway.base_url + "/health", timeout=10).status_code
            except httpx.TransportError:
                return None

        assert health() == 200
        triton.stop()
        wait_until(lambda: health() == 503, 60, "/health answering 503 with Triton down")
        assert httpx.get(gateway.base_url + "/health", timeout=10).json() == {"status": "not_serving"}
        restarted = TritonServer(triton.model_repository, triton.models, triton.ports, triton.work_dir)
        restarted.start()
        try:
            restarted.wait_ready(120)
            wait_until(lambda: health() == 200, 60, "/health answering 200 with Triton back")

            texts = [f"a long-ish passage number {i} " * 6 for i in range(300)]
            outcome: dict = {}
            successes = lambda: int(  # noqa: E731
                triton_grpc.InferenceServerClient(restarted.grpc_url).get_inference_statistics("minilm", as_json=True)
                ["model_stats"][0]["inference_stats"].get("success", {}).get("count", 0)
            )
            before = successes()

            def call() -> None:
                outcome["response"] = httpx.post(gateway.base_url + "/v1/embeddings", json={"input": texts}, timeout=120)

            worker = threading.Thread(target=call)
            worker.start()
            wait_until(lambda: successes() > before or not worker.is_alive(), 120, "the call reaching Triton")
            in_flight = worker.is_alive()
            gateway.process.send_signal(signal.SIGTERM)
            seen = []
            while worker.is_alive():
                seen.append(health())
            worker.join(120)
            assert in_flight, "the call ended before SIGTERM: draining was not exercised"
            assert outcome["response"].status_code == 200 and len(outcome["response"].json()["data"]) == 300
            assert 200 not in seen, seen
            assert gateway.process.wait(60) == 0
        finally:
            restarted.stop()
    finally:
        gateway.stop()
        triton.stop()


# -- keys and overload: gateways of their own over the same Triton ---------------------------


@pytest.fixture(scope="module")
def keyed(stack, tmp_path_factory):
    triton, _ = stack
    work = tmp_path_factory.mktemp("http_keyed")
    keys = {"embed": new_key(), "models": new_key()}
    (work / "keys.jsonl").write_text(
        key_line("embedder", keys["embed"], ["ragserve.v1.Embed"]) + "\n" + key_line("lister", keys["models"], ["ragserve.v1.Models"]) + "\n"
    )
    gateway = HttpGateway(triton, ["minilm"], work / "gateway.log", "--api-keys-file", str(work / "keys.jsonl"))
    try:
        yield gateway.wait_serving(timeout=120), keys
    finally:
        gateway.stop()


def test_the_same_api_keys_as_grpc(keyed):
    gateway, keys = keyed
    with pytest.raises(openai.AuthenticationError) as missing:
        gateway.openai(api_key="not-a-key", max_retries=0).embeddings.create(input="x", model=EMBEDDER)
    assert missing.value.status_code == 401
    no_key = httpx.post(gateway.base_url + "/v1/embeddings", json={"input": "x"})
    assert "API key is required" in _error(no_key, 401, "authentication_error")["message"]
    with pytest.raises(openai.PermissionDeniedError):
        gateway.openai(api_key=keys["models"], max_retries=0).embeddings.create(input="x", model=EMBEDDER)
    assert gateway.openai(api_key=keys["models"]).models.list().data
    assert len(gateway.openai(api_key=keys["embed"]).embeddings.create(input="x", model=EMBEDDER).data[0].embedding) == 384
    x_api_key = httpx.post(gateway.base_url + "/v1/embeddings", json={"input": "x"}, headers={"x-api-key": keys["embed"]})
    assert x_api_key.status_code == 200
    assert httpx.get(gateway.base_url + "/health").status_code == 200  # probes carry no keys


@pytest.fixture(scope="module")
def tiny(stack, tmp_path_factory):
    triton, _ = stack
    work = tmp_path_factory.mktemp("http_tiny")
    gateway = HttpGateway(triton, ["minilm"], work / "gateway.log", "--max-concurrent-requests", "1")
    try:
        yield gateway.wait_serving(timeout=120)
    finally:
        gateway.stop()


async def test_overload_is_429_with_retry_after(tiny):
    passages = [f"passage {i} " + "words about rivers and seas " * 12 for i in range(32)]
    async with httpx.AsyncClient(base_url=tiny.base_url, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/embeddings", json={"input": passages}) for _ in range(8)))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 429 in statuses, statuses
    for response in responses:
        if response.status_code == 429:
            error = _error(response, 429, "rate_limit_error")
            assert error["code"] == "overload" and "capacity" in error["message"]
            assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) >= 1
