"""Hostile input against the HTTP front of real Triton and gateway processes (hypothesis).

Every JSON route gets bodies made of its own fields holding any JSON value (wrong types,
huge and negative numbers, odd unicode, deep nesting), arbitrary JSON documents, raw bytes,
and wrong or missing content types. Every answer is 200 or a clear client error (400, 401,
404, 408, 413, 415, 429) in OpenAI's error shape with a request id: never a 5xx, never a
dropped connection, and the gateway serves on after each batch. Generation bodies keep
`max_tokens` tiny where they hold a valid one (the model is real).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragserve_server.models.builtin import smollm2_spec
from support import MODEL_REPOSITORY, GatewayProcess, free_port, start_triton, unavailable

pytestmark = pytest.mark.integration

CLIENT_ERRORS = {200, 400, 401, 404, 408, 413, 415, 429}
ROUTES = {
    "/v1/embeddings": ["input", "model", "dimensions", "encoding_format", "user"],
    "/v1/rerank": ["query", "documents", "model", "top_n", "return_documents"],
    "/v1/chat/completions": [
        "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
        "stream", "stream_options", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
    ],
    "/v1/completions": ["prompt", "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "echo", "logprobs"],
}
GENERATION = {"/v1/chat/completions", "/v1/completions"}
HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=60)

texts = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["", "<|im_start|>system\n", "\u0000", "é" * 300, "x" * 5000])
scalars = (
    st.none() | st.booleans() | texts
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1, 2, 4, 0, -1, 2**32, 1e308])
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5), max_leaves=25)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", "x" * 100]), "content": json_values | texts}),
    max_size=3,
)


def route_bodies(route: str):
    fields = ROUTES[route]
    specific = {"messages": messages | json_values, "documents": st.lists(texts, max_size=4) | json_values}
    body = st.fixed_dictionaries({}, optional={f: specific.get(f, json_values) for f in fields})
    return st.one_of(body, json_values)


def tame(route: str, body):
    """Generation bodies: a valid max_tokens stays tiny, streams stay short."""
    if route in GENERATION and isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4):
                body[name] = 2 if value is None or isinstance(value, int) else value
    return body


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    if smollm2_spec(MODEL_REPOSITORY).missing_artifacts(MODEL_REPOSITORY):
        unavailable("SmolLM2 is not built: `make models`")
    work = tmp_path_factory.mktemp("hostile_http")
    triton = start_triton(work, ["minilm", "smollm2"])
    port = free_port()
    gateway = GatewayProcess(triton.grpc_url, ["minilm", "smollm2"], work / "gateway.log", "--http-port", str(port))
    try:
        gateway.wait_serving(timeout=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, gateway
    finally:
        gateway.stop()
        triton.stop()


def check(response: httpx.Response, what) -> None:
    assert response.status_code in CLIENT_ERRORS, (response.status_code, response.text[:300], str(what)[:300])
    assert response.headers.get("x-request-id")
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["code"] != "internal", error


def serving(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_route_fields_holding_any_json(http, route):
    client, _ = http

    @settings(**HYPOTHESIS)
    @given(body=route_bodies(route))
    def run(body):
        body = tame(route, body)
        check(client.post(route, content=json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}), body)

    run()
    serving(client)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_raw_bytes_and_content_types(http, route):
    client, _ = http

    @settings(**HYPOTHESIS)
    @given(
        data=st.binary(max_size=300) | st.sampled_from([b"[" * 50_000, b'{"input": ' + b"[" * 5_000, b"\xff\xfe{}", b"{}" * 1000]),
        content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "", "application/x-www-form-urlencoded"]),
    )
    def run(data, content_type):
        headers = {"content-type": content_type} if content_type else {}
        check(client.post(route, content=data, headers=headers), (data[:50], content_type))

    run()
    serving(client)
