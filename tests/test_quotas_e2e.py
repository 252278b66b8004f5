"""Per-key quotas, fail-closed keys and safe defaults, end to end: real gateway processes over
the session's Triton (MiniLM), grpcio / the SDK and the openai client.

- a key's concurrency share and rate: RESOURCE_EXHAUSTED / 429 with a retry hint, over both
  fronts, counted per key name in the metrics; another key is not held back;
- a deleted keys file refuses every key until it is back;
- a non-loopback --host without keys and TLS does not start (unless --trust-network yes);
- the bundled Triton's model-repository API answers only the admin header.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import grpc
import httpx
import openai
import pytest

import ragserve
from ragserve.v1 import embed_pb2, embed_pb2_grpc
from ragserve_server.security.keys import key_line, new_key
from ragserve_server.supervision.triton_launcher import ADMIN_HEADER, GRPC_ADMIN_HEADER, TritonPorts, TritonServer
from support import MODEL_REPOSITORY, GatewayProcess, free_port, wait_for_health

pytestmark = pytest.mark.integration

EMBEDDER = "all-minilm-l6-v2"
PASSAGES = [f"passage {i} " + "about rivers and the sea " * 20 for i in range(32)]


@pytest.fixture(scope="module")
def quota_gateway(triton, tmp_path_factory):
    work = tmp_path_factory.mktemp("quotas")
    keys = {"narrow": new_key(), "slow": new_key(), "free": new_key()}
    (work / "keys.jsonl").write_text(
        "\n".join(
            [
                key_line("narrow", keys["narrow"]).replace("}", ', "max_concurrent": 1}'),
                key_line("slow", keys["slow"]).replace("}", ', "rate": 0.5, "burst": 2}'),
                key_line("free", keys["free"]),
            ]
        )
        + "\n"
    )
    http_port = free_port()
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, work / "gateway.log",
        "--api-keys-file", str(work / "keys.jsonl"), "--http-port", str(http_port), metrics_port=free_port(),
    )
    gateway.http_port = http_port
    yield gateway.wait_serving(timeout=120), keys, work
    gateway.stop()


def _metric(gateway, line_start: str) -> float:
    with urllib.request.urlopen(gateway.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


async def test_concurrency_share_refuses_the_key_not_the_others(quota_gateway):
    gateway, keys, _ = quota_gateway
    async with ragserve.AsyncClient(gateway.address, api_key=keys["narrow"], retries=0, timeout=60) as narrow, \
            ragserve.AsyncClient(gateway.address, api_key=keys["free"], retries=0, timeout=60) as free:
        results = await asyncio.gather(*(narrow.embed(PASSAGES) for _ in range(12)), return_exceptions=True)
        others = await asyncio.gather(*(free.embed(PASSAGES) for _ in range(4)))
    refused = [r for r in results if isinstance(r, ragserve.OverloadedError)]
    served = [r for r in results if isinstance(r, ragserve.EmbedResult)]
    assert refused and served and len(refused) + len(served) == 12, results
    assert "'narrow'" in refused[0].message and "share is 1" in refused[0].message
    assert all(r.embeddings.shape == (32, 384) for r in others)  # the other key is not held back
    assert _metric(gateway, 'ragserve_key_requests_total{code="RESOURCE_EXHAUSTED",key="narrow"}') >= len(refused)
    assert _metric(gateway, 'ragserve_rejections_total{reason="key_quota",service="Embed"}') >= len(refused)
    assert _metric(gateway, 'ragserve_key_requests_total{code="OK",key="free"}') >= 4


def test_rate_refuses_with_a_retry_hint_over_both_fronts(quota_gateway):
    gateway, keys, _ = quota_gateway
    metadata = [("authorization", f"Bearer {keys['slow']}")]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        outcomes = []
        for _ in range(3):  # a burst of 2, refilled at one call per 2 s
            try:
                stub.Embed(embed_pb2.EmbedRequest(inputs=["rated"]), metadata=metadata, timeout=30)
                outcomes.append("OK")
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
                trailers = dict(error.trailing_metadata())
                assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= 2000, trailers
                assert "rate of 0.5 calls a second" in error.details()
    assert outcomes.count("OK") <= 2 and outcomes[-1] == "RESOURCE_EXHAUSTED", outcomes
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key=keys["slow"], max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as limited:
        client.embeddings.create(input="rated over http", model=EMBEDDER)
    assert limited.value.status_code == 429 and int(limited.value.response.headers["retry-after-ms"]) > 0
    assert limited.value.body["code"] == "key_quota"
    # The bucket refills: after the hint, the key is served again.
    time.sleep(int(limited.value.response.headers["retry-after-ms"]) / 1000 + 0.1)
    assert client.embeddings.create(input="after the wait", model=EMBEDDER).data


def test_deleted_keys_file_fails_closed(quota_gateway):
    gateway, keys, work = quota_gateway
    keys_file = work / "keys.jsonl"
    saved = keys_file.read_text()
    url = f"http://127.0.0.1:{gateway.http_port}/v1/embeddings"
    auth = {"authorization": f"Bearer {keys['free']}"}
    assert httpx.post(url, json={"input": "before"}, headers=auth, timeout=30).status_code == 200
    keys_file.unlink()
    try:
        deadline = time.monotonic() + 15
        while httpx.post(url, json={"input": "while deleted"}, headers=auth, timeout=30).status_code != 401:
            assert time.monotonic() < deadline, "a deleted keys file still lets its keys in"
            time.sleep(0.2)
        with ragserve.Client(gateway.address, api_key=keys["free"], retries=0, timeout=30) as client:
            with pytest.raises(ragserve.UnauthenticatedError):
                client.embed(["grpc while deleted"])
    finally:
        staging = keys_file.with_suffix(".new")
        staging.write_text(saved)
        staging.replace(keys_file)
    deadline = time.monotonic() + 15
    while httpx.post(url, json={"input": "restored"}, headers=auth, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the restored keys file is not read"
        time.sleep(0.2)


def test_exposed_host_without_keys_or_tls_does_not_start(triton, tmp_path):
    base = [sys.executable, "-m", "ragserve_server", "--triton-url", triton.grpc_url, "--triton-models", "minilm", "--metrics-port", "0"]
    keys_file = tmp_path / "keys.jsonl"
    keys_file.write_text(key_line("k", new_key()) + "\n")
    for args, message in (
        (["--host", "0.0.0.0", "--port", "0"], "neither --api-keys-file nor --tls-cert"),
        (["--host", "0.0.0.0", "--port", "0", "--api-keys-file", str(keys_file)], "clear text"),
    ):
        out = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    port = free_port()
    trusted = subprocess.Popen(base + ["--host", "0.0.0.0", "--port", str(port), "--trust-network", "yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=60)
    finally:
        trusted.terminate()
        trusted.wait(30)


def test_bundled_triton_model_control_needs_the_admin_header(tmp_path):
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    server = TritonServer(MODEL_REPOSITORY, ["minilm"], TritonPorts(free_port(), free_port(), free_port()), tmp_path, admin_key="s3cret-admin")
    server.start()
    try:
        server.wait_ready(180)
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("minilm")  # health and inference stay open to the gateway
        with pytest.raises(InferenceServerException, match="(?i)restricted|header|permission|unavailable"):
            client.unload_model("minilm")
        with pytest.raises(InferenceServerException):
            client.get_model_repository_index()
        assert client.is_model_ready("minilm")
        client.get_model_repository_index(headers={GRPC_ADMIN_HEADER: "s3cret-admin"})  # the header opens it
        with httpx.Client(base_url=f"http://127.0.0.1:{server.ports.http}", timeout=30) as http:
            assert http.post("/v2/repository/models/minilm/unload").status_code in (401, 403)
            assert http.post("/v2/repository/index", headers={ADMIN_HEADER: "s3cret-admin"}).status_code == 200
        assert client.is_model_ready("minilm")
    finally:
        server.stop()
