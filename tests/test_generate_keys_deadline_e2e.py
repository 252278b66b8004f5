"""Generate behind keys, and the HTTP deadline, over a real generation gateway (SmolLM2 in
Triton's in-flight batching engine) (issue 25).

- Keys on Generate: no key is UNAUTHENTICATED over gRPC (Generate and GenerateStream) and 401
  over HTTP chat; a key whose services leave out Generate is PERMISSION_DENIED / 403; a key
  with Generate gets the answer. Refused calls never reach the engine (its token counter).
- The HTTP deadline (`x-request-timeout`, transport/http/streaming.py): a spent deadline
  answers 504 with OpenAI's error shape (a stream under way ends with that error event), and
  the engine's work stops with it (its token counter, far short of max_tokens); a malformed
  header is a 400; a deadline long enough is answered as if there were none.

One Triton and one keyed gateway (gRPC and HTTP) for the module; each test stands alone.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

import ragserve
from ragserve_server.models.builtin import smollm2_spec
from support import MODEL_REPOSITORY, GatewayProcess, free_port, metric_value, start_triton, unavailable, wait_until
from test_security_e2e import new_key

pytestmark = pytest.mark.integration

GENERATOR = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name the capital of France."}]
# A raw prompt the model continues for its 1000 tokens (minutes here), not a chat it may end early.
LONG = {"model": GENERATOR, "prompt": "Count from one to one thousand:", "max_tokens": 1000, "temperature": 0}


@pytest.fixture(scope="module")
def keyed_generation(tmp_path_factory):
    """(triton, gateway, HTTP base url, keys): a gateway with a keys file over a SmolLM2 Triton."""
    if smollm2_spec(MODEL_REPOSITORY).missing_artifacts(MODEL_REPOSITORY):
        unavailable("SmolLM2 is not built: `make models`")
    work = tmp_path_factory.mktemp("generate_keys")
    keys_file = work / "keys.jsonl"
    keys_file.write_text("# ragserve API keys\n")
    keys = {
        "generate": new_key(keys_file, "chat-app", "ragserve.v1.Generate"),
        "embed_only": new_key(keys_file, "search-backend", "ragserve.v1.Embed", "ragserve.v1.Rerank"),
    }
    triton = start_triton(work, ["smollm2"])
    http_port = free_port()
    gateway = GatewayProcess(
        triton.grpc_url, ["smollm2"], work / "gateway.log", "--api-keys-file", str(keys_file), "--http-port", str(http_port)
    )
    try:
        gateway.wait_serving(timeout=120)
        yield triton, gateway, f"http://127.0.0.1:{http_port}", keys
    finally:
        gateway.stop()
        triton.stop()


def engine(triton, name: str) -> float:
    """The generation engine's own counters on Triton's metrics port."""
    return metric_value(triton.metrics_url, name)


def idle_engine(triton) -> float:
    """Waits for no running sequence; returns the tokens generated so far."""
    wait_until(lambda: engine(triton, "ragserve_engine_running_sequences") == 0, 120, "an idle engine")
    return engine(triton, "ragserve_engine_generated_tokens_total")


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def openai_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["type"] == kind and set(error) == {"message", "type", "param", "code"}, error
    return error


# -- keys on Generate ------------------------------------------------------------------------


def test_generate_needs_a_key_that_names_the_generate_service(keyed_generation):
    triton, gateway, base_url, keys = keyed_generation
    before = idle_engine(triton)
    options = dict(messages=MESSAGES, max_tokens=4, temperature=0, timeout=120)
    # gRPC: no key, then a key for other services, on both methods.
    with ragserve.Client(gateway.address, retries=0) as client:
        with pytest.raises(ragserve.UnauthenticatedError):
            client.generate(**options)
        with pytest.raises(ragserve.UnauthenticatedError):
            list(client.stream(**options))
    with ragserve.Client(gateway.address, api_key=keys["embed_only"], retries=0) as client:
        with pytest.raises(ragserve.PermissionDeniedError):
            client.generate(**options)
        with pytest.raises(ragserve.PermissionDeniedError):
            list(client.stream(**options))
    # HTTP chat: the same answers as 401 / 403 in OpenAI's shape (a stream too).
    body = {"model": GENERATOR, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for stream in (False, True):
            openai_error(http.post("/v1/chat/completions", json={**body, "stream": stream}), 401, "authentication_error")
            refused = http.post("/v1/chat/completions", json={**body, "stream": stream}, headers=bearer(keys["embed_only"]))
            openai_error(refused, 403, "permission_error")
    # Refused before any work: the engine generated nothing for them.
    assert engine(triton, "ragserve_engine_generated_tokens_total") == before
    # The right key is answered, over both transports.
    with ragserve.Client(gateway.address, api_key=keys["generate"], retries=0) as client:
        answer = client.generate(**options)
        streamed = list(client.stream(**options))
    assert answer.usage.completion_tokens >= 1 and answer.text
    assert streamed[-1].text == answer.text  # greedy: the same text
    with httpx.Client(base_url=base_url, timeout=120) as http:
        served = http.post("/v1/chat/completions", json=body, headers=bearer(keys["generate"]))
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == answer.text
    # The access log names the key of each refused and answered call.
    calls = [e for e in gateway.log_events() if e.get("event") == "rpc" and e.get("service") == "Generate"]
    assert {(e["status"], e.get("api_key_name")) for e in calls} >= {
        ("UNAUTHENTICATED", None), ("PERMISSION_DENIED", "search-backend"), ("OK", "chat-app"),
    }, calls


# -- the HTTP deadline -------------------------------------------------------------------------


def test_a_spent_http_deadline_answers_504_and_stops_the_engine(keyed_generation):
    triton, gateway, base_url, keys = keyed_generation
    before = idle_engine(triton)
    headers = {**bearer(keys["generate"]), "x-request-timeout": "1.5"}
    with httpx.Client(base_url=base_url, timeout=60) as http:  # far beyond the deadline, far short of 1000 tokens
        started = time.monotonic()
        answer = http.post("/v1/completions", json=LONG, headers=headers)
        took = time.monotonic() - started
    at_answer = engine(triton, "ragserve_engine_generated_tokens_total")
    error = openai_error(answer, 504, "timeout_error")
    assert error["code"] == "deadline" and "x-request-timeout" in error["message"], error
    assert answer.headers["x-request-id"]
    # Ended at its deadline, not after the minutes 1000 tokens take here (generous for a loaded machine).
    assert took < 30, took
    # The engine's work was cancelled with the call: its sequence is dropped at once, short of 1000 tokens.
    after = idle_engine(triton)
    assert after - at_answer < 200 and after - before < 1000, (before, at_answer, after)
    # Recorded as a spent deadline, as gRPC's DEADLINE_EXCEEDED.
    wait_until(
        lambda: any(e.get("event") == "rpc" and e.get("transport") == "http" and e.get("status") == "DEADLINE_EXCEEDED" for e in gateway.log_events()),
        30, "the access log line of the expired call",
    )


def test_a_spent_http_deadline_ends_a_stream_with_the_error_event(keyed_generation):
    triton, gateway, base_url, keys = keyed_generation
    before = idle_engine(triton)
    headers = {**bearer(keys["generate"]), "x-request-timeout": "8"}  # room for the first tokens on a loaded machine
    events = []
    with httpx.Client(base_url=base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}, headers=headers) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
    at_end = engine(triton, "ragserve_engine_generated_tokens_total")
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last, events[-3:]  # not a finish chunk: nothing is answered past the deadline
    assert last["error"]["type"] == "timeout_error" and last["error"]["code"] == "deadline", last
    assert any("choices" in json.loads(e) for e in events[:-2])  # it had started
    after = idle_engine(triton)  # the engine stopped with the stream, short of its 1000 tokens
    assert after - at_end < 200 and after - before < 1000, (before, at_end, after)


def test_a_deadline_long_enough_is_served_and_a_malformed_one_refused(keyed_generation):
    _, _, base_url, keys = keyed_generation
    body = {"model": GENERATOR, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        served = http.post("/v1/chat/completions", json=body, headers={**bearer(keys["generate"]), "x-request-timeout": "120"})
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["message"]["content"]
        for value in ("soon", "0", "-1", "nan", "inf", "1e9"):
            refused = http.post("/v1/chat/completions", json=body, headers={**bearer(keys["generate"]), "x-request-timeout": value})
            error = openai_error(refused, 400, "invalid_request_error")
            assert "x-request-timeout" in error["message"], (value, error)
