"""Security pieces in-process (fake backend, no real processes): the auth check as a plain
function, per-key quotas on a fake clock, spans that begin after the key check with inbound
baggage dropped, and the start-up refusals of exposed settings."""

from __future__ import annotations

import pytest
from opentelemetry import baggage, context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ragserve
from ragserve_server.app import create_gateway
from ragserve_server.errors import PermissionDenied, Unauthenticated
from ragserve_server.main import StartupError, check_exposure
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.models.catalog import build_catalog
from ragserve_server.observability import tracing
from ragserve_server.security.auth import Authenticator, Identity
from ragserve_server.security.keys import KEYED_SERVICES, ApiKey, KeysFileError, KeyStore, key_line, parse_keys
from ragserve_server.security.quotas import KeyQuotas, QuotaExceeded
from ragserve_server.settings import Settings

from fakes import FakeBackend


def test_auth_is_a_plain_check_of_service_and_headers(tmp_path):
    keys = tmp_path / "keys.jsonl"
    keys.write_text(key_line("embedder", "rs_one", ["ragserve.v1.Embed"]) + "\n")
    auth = Authenticator(KeyStore(keys, KEYED_SERVICES))
    assert isinstance(auth.check("Embed", {}), Unauthenticated)
    assert isinstance(auth.check("Embed", {"authorization": "Bearer rs_two"}), Unauthenticated)
    denied = auth.check("ragserve.v1.Rerank", {"x-api-key": "rs_one"})
    assert isinstance(denied, PermissionDenied) and denied.key_name == "embedder"
    ok = auth.check("Embed", [("authorization", "Bearer rs_one")])  # gRPC metadata pairs work too
    assert isinstance(ok, Identity) and ok.name == "embedder"
    assert Authenticator(None).check("Embed", {}).key is None  # no keys: open


def test_quota_fields_are_checked_and_named():
    line = '{"name": "t", "sha256": "' + "0" * 64 + '", "max_concurrent": 2, "rate": 5}'
    (entry,) = parse_keys(line).values()
    assert (entry.max_concurrent, entry.rate, entry.burst) == (2, 5.0, 5.0)
    for bad, message in (('"max_concurrent": 0', "max_concurrent"), ('"rate": -1', "'rate'"), ('"burst": 3', "needs 'rate'")):
        with pytest.raises(KeysFileError, match=message):
            parse_keys('{"name": "t", "sha256": "' + "0" * 64 + '", ' + bad + "}")


def test_key_quotas_share_and_token_bucket():
    now = [100.0]
    quotas = KeyQuotas(clock=lambda: now[0])
    key = ApiKey("tenant", "0" * 64, None, max_concurrent=2, rate=2.0, burst=3.0)
    first, second = quotas.take(key), quotas.take(key)
    with pytest.raises(QuotaExceeded, match="share is 2") as refused:
        quotas.take(key)
    assert refused.value.retry_after > 0
    first()
    first()  # idempotent
    third = quotas.take(key)  # the burst of 3 is now spent
    second(), third()
    with pytest.raises(QuotaExceeded, match="rate of 2 calls a second") as refused:
        quotas.take(key)
    assert refused.value.retry_after == pytest.approx(0.5)
    now[0] += 0.5
    quotas.take(key)()
    # A reloaded key (a new ApiKey object, same name) keeps its state.
    reloaded = ApiKey("tenant", "0" * 64, None, max_concurrent=2, rate=2.0, burst=3.0)
    with pytest.raises(QuotaExceeded):
        quotas.take(reloaded)
    assert quotas.take(ApiKey("free", "1" * 64, None)) is not None  # no quota: nothing counted


def test_deleted_or_emptied_keys_file_fails_closed(tmp_path):
    keys = tmp_path / "keys.jsonl"
    keys.write_text(key_line("a", "rs_one") + "\n")
    store = KeyStore(keys, KEYED_SERVICES, check_interval=0)
    assert store.lookup("rs_one")
    keys.unlink()
    assert store.lookup("rs_one") is None
    keys.write_text(key_line("a", "rs_one") + "\n")
    assert store.lookup("rs_one")
    keys.write_text("")
    assert store.lookup("rs_one") is None


@pytest.fixture
async def traced_keyed(tmp_path):
    keys = tmp_path / "keys.jsonl"
    keys.write_text(key_line("tracer", "rs_traced") + "\n")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    backend = FakeBackend()
    seen: list = []
    original = backend.infer

    async def infer(*args, **kwargs):
        seen.append((tracing.outgoing_metadata(), baggage.get_all(context.get_current())))
        return await original(*args, **kwargs)

    backend.infer = infer
    settings = Settings(port=0, api_keys_file=str(keys), health_poll_interval=0.05)
    gateway = await create_gateway(settings, backend, build_catalog([minilm_spec()]))
    try:
        yield gateway, exporter, seen
    finally:
        await gateway.stop(0)
        tracing.install(None)


async def test_spans_begin_after_the_key_check_and_baggage_is_dropped(traced_keyed):
    gateway, exporter, seen = traced_keyed
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sent = [("traceparent", traceparent), ("baggage", "tenant=evil,secret=1")]
    async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0, metadata=sent) as client:
        with pytest.raises(ragserve.UnauthenticatedError):
            await client.embed(["no key"])
    assert exporter.get_finished_spans() == ()  # refused before the span
    async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", retries=0, api_key="rs_traced", metadata=sent) as client:
        await client.embed(["with a key"])
    spans = exporter.get_finished_spans()
    call = next(s for s in spans if s.name == "ragserve.v1.Embed/Embed")
    assert format(call.context.trace_id, "032x") == traceparent.split("-")[1]  # joined the caller's trace
    (outgoing, bag), *_ = seen
    assert bag == {} and not any(name == "baggage" for name, _ in outgoing or ())


def test_exposed_settings_refuse_to_start():
    for settings, message in (
        (Settings(host="0.0.0.0"), "neither --api-keys-file nor --tls-cert"),
        (Settings(host="10.1.2.3", api_keys_file="keys.jsonl"), "clear text"),
        (Settings(host="0.0.0.0", trust_network="maybe"), "use yes or no"),
        (Settings(max_http_body_bytes=0), "--max-http-body-bytes"),
    ):
        with pytest.raises(StartupError, match=message):
            check_exposure(settings)
    for fine in (Settings(), Settings(host="0.0.0.0", trust_network="yes"), Settings(host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem")):
        check_exposure(fine)
