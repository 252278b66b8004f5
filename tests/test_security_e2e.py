"""Transport security and API keys, end to end: real gateway processes (and a real Triton with
TLS), certificates made at test time, the real SDK.

- keys: no key / a wrong key UNAUTHENTICATED, a key without the service PERMISSION_DENIED, the
  right key OK, health open, reflection keyed; keys never in the log, the access log names the
  key, the rejection metric counts the refusals; the keys file re-read on change.
- mTLS required: a client without a certificate (or with one from another CA) fails.
- a rotated certificate (new pair written to the same paths) is served without a restart.
- the gateway speaks TLS with a client certificate to a Triton started with --grpc-use-ssl-mutual.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import ragserve
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer
from support import GatewayProcess, free_port, wait_until

pytestmark = pytest.mark.integration

# -- certificates ---------------------------------------------------------------------------


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, cert_path: Path, key_path: Path) -> None:
        key_path.write_bytes(self.key_pem)
        cert_path.write_bytes(self.cert_pem)


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(ca: Issued, name: str, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(name, ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca("ragserve test CA")
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    issue(ca, "gateway-1", server=True).write(folder / "server.pem", folder / "server.key")
    issue(ca, "search-backend", server=False).write(folder / "client.pem", folder / "client.key")
    stranger = make_ca("another CA")
    issue(stranger, "stranger", server=False).write(folder / "stranger.pem", folder / "stranger.key")
    return folder, ca


# -- helpers --------------------------------------------------------------------------------


def secure_health(address: str, credentials: grpc.ChannelCredentials, timeout: float = 2.0) -> int | None:
    with grpc.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_secure_serving(gateway: GatewayProcess, credentials: grpc.ChannelCredentials, timeout: float = 60.0) -> GatewayProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited {gateway.process.returncode}:\n{gateway.log_tail()}")
        if secure_health(gateway.address, credentials) == health_pb2.HealthCheckResponse.SERVING:
            return gateway
        time.sleep(0.2)
    gateway.stop()
    raise RuntimeError(f"gateway not serving over TLS; the end of {gateway.log_path}:\n{gateway.log_tail()}")


def peer_certificate(port: int, ca_file: Path) -> x509.Certificate:
    """The certificate a fresh TLS connection to the gateway is shown (verified against `ca_file`)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def new_key(keys_file: Path, name: str, *services: str) -> str:
    """A key made by the documented helper, its line appended to the keys file."""
    args = [sys.executable, "-m", "ragserve_server.security.keys", "new", "--name", name, "--append", str(keys_file)]
    if services:
        args += ["--services", *services]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    key = out.stdout.strip()
    assert key.startswith("rs_") and len(key) > 40 and key not in out.stderr
    return key


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# -- a TLS gateway with API keys -----------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(triton, pki, tmp_path_factory):
    folder, _ = pki
    work = tmp_path_factory.mktemp("keyed")
    keys_file = work / "keys.jsonl"
    keys_file.write_text("# ragserve API keys\n")
    keys = {
        "search": new_key(keys_file, "search-backend", "ragserve.v1.Embed", "ragserve.v1.Rerank"),
        "models": new_key(keys_file, "models-only", "ragserve.v1.Models"),
        "tokens": new_key(keys_file, "tokenizer", "ragserve.v1.Tokenize"),
    }
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, work / "gateway.log",
        "--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
        "--api-keys-file", str(keys_file), "--reflection", "keyed",
        metrics_port=free_port(),
    )
    credentials = grpc.ssl_channel_credentials((folder / "ca.pem").read_bytes())
    yield wait_secure_serving(gateway, credentials), keys, keys_file
    gateway.stop()


def test_api_keys_answer_the_right_codes(keyed, pki):
    gateway, keys, _ = keyed
    ca = pki[0] / "ca.pem"
    with ragserve.Client(gateway.address, root_certificates=ca, timeout=30) as client:
        with pytest.raises(ragserve.UnauthenticatedError, match="API key is required"):
            client.embed(["no key"])
    with ragserve.Client(gateway.address, root_certificates=ca, api_key="rs_" + "x" * 43, timeout=30) as client:
        with pytest.raises(ragserve.UnauthenticatedError, match="not valid"):
            client.embed(["wrong key"])
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["models"], timeout=30) as client:
        with pytest.raises(ragserve.PermissionDeniedError, match="'models-only' may not call ragserve.v1.Embed") as refused:
            client.embed(["key without Embed"])
        assert refused.value.request_id  # refusals carry the request id like any other error
        assert [m.name for m in client.list_models()]
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["search"], timeout=30) as client:
        assert client.embed(["the right key"]).embeddings.shape == (1, 384)
        assert client.rerank("capital of France", ["Berlin", "Paris"]).results
        with pytest.raises(ragserve.PermissionDeniedError):
            client.list_models()
    # Tokenize is keyed like the others. (Generate is too, but this gateway serves no generation
    # model, so its service is not registered: test_security_http_e2e's keyed gateway has one.)
    with ragserve.Client(gateway.address, root_certificates=ca, timeout=30) as client:
        with pytest.raises(ragserve.UnauthenticatedError):
            client.tokenize(["no key"])
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["search"], timeout=30) as client:
        with pytest.raises(ragserve.PermissionDeniedError, match="may not call ragserve.v1.Tokenize"):
            client.tokenize(["a key without Tokenize"])
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["tokens"], timeout=30) as client:
        assert client.tokenize(["the right key"]).results[0].ids
        with pytest.raises(ragserve.PermissionDeniedError):
            client.embed(["a key without Embed"])
    # x-api-key works as well as the bearer token.
    with ragserve.Client(gateway.address, root_certificates=ca, metadata=[("x-api-key", keys["search"])], timeout=30) as client:
        assert client.embed(["x-api-key"]).embeddings.shape == (1, 384)


def test_health_is_open_and_reflection_needs_a_key(keyed, pki):
    gateway, keys, _ = keyed
    credentials = grpc.ssl_channel_credentials((pki[0] / "ca.pem").read_bytes())
    assert secure_health(gateway.address, credentials) == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(gateway.address, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=[("authorization", f"Bearer {keys['models']}")])
        assert "ragserve.v1.Embed" in {s.name for s in answer.list_services_response.service}


def test_keys_stay_out_of_the_log_and_the_access_log_names_the_key(keyed, pki):
    """Stands alone: its own three calls (allowed, refused, unauthenticated), found in the
    access log by the request ids it sent."""
    gateway, keys, _ = keyed
    ca = pki[0] / "ca.pem"
    tag = uuid.uuid4().hex[:8]
    ids = {name: f"access-{name}-{tag}" for name in ("ok", "denied", "nokey")}
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["search"], timeout=30) as client:
        client.embed(["named in the access log"], metadata=[("x-request-id", ids["ok"])])
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["models"], timeout=30) as client:
        with pytest.raises(ragserve.PermissionDeniedError):
            client.embed(["refused"], metadata=[("x-request-id", ids["denied"])])
    with ragserve.Client(gateway.address, root_certificates=ca, timeout=30) as client:
        with pytest.raises(ragserve.UnauthenticatedError):
            client.embed(["no key"], metadata=[("x-request-id", ids["nokey"])])

    def access_lines():  # the access line is written as the call ends
        found = {e.get("request_id"): e for e in gateway.log_events() if e.get("event") == "rpc"}
        return found if all(i in found for i in ids.values()) else None

    access = wait_until(access_lines, 60, "the three access lines")
    text = gateway.log_path.read_text(errors="replace")
    for key in keys.values():
        assert key not in text
        assert key[3:20] not in text
    ok, denied, nokey = (access[ids[n]] for n in ("ok", "denied", "nokey"))
    assert ok.get("api_key_name") == "search-backend" and ok.get("status") == "OK"
    assert denied.get("api_key_name") == "models-only" and denied.get("status") == "PERMISSION_DENIED"
    assert "api_key_name" not in nokey and nokey.get("status") == "UNAUTHENTICATED"
    metrics = scrape(gateway.metrics_url)
    assert 'ragserve_rejections_total{reason="unauthenticated",service="Embed"}' in metrics
    assert 'ragserve_rejections_total{reason="permission_denied",service="Embed"}' in metrics
    assert 'code="UNAUTHENTICATED",method="Embed",service="Embed"' in metrics


def test_keys_file_is_reread_on_change(keyed, pki):
    gateway, keys, keys_file = keyed
    ca = pki[0] / "ca.pem"
    later = new_key(keys_file, "added-later")
    deadline = time.monotonic() + 60  # the watcher polls; generous for a loaded machine
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=later, timeout=30) as client:
        while True:
            try:
                assert client.list_models()
                break
            except ragserve.UnauthenticatedError:
                assert time.monotonic() < deadline, "a key added to the file is not accepted"
                time.sleep(0.2)
    # Take it out again (the file replaced atomically, as a deployment would).
    kept = [line for line in keys_file.read_text().splitlines() if '"added-later"' not in line]
    staging = keys_file.with_suffix(".new")
    staging.write_text("\n".join(kept) + "\n")
    staging.replace(keys_file)
    deadline = time.monotonic() + 60  # the watcher polls; generous for a loaded machine
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=later, timeout=30) as client:
        while True:
            try:
                client.list_models()
            except ragserve.UnauthenticatedError:
                break
            assert time.monotonic() < deadline, "a key taken out of the file is still accepted"
            time.sleep(0.2)
    with ragserve.Client(gateway.address, root_certificates=ca, api_key=keys["search"], timeout=30) as client:
        assert client.embed(["still here"]).embeddings.shape == (1, 384)


# -- mTLS and certificate rotation ---------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(triton, pki, tmp_path_factory):
    folder, _ = pki
    work = tmp_path_factory.mktemp("mtls")
    # Its own copies: the rotation test rewrites them.
    for name in ("server.pem", "server.key"):
        (work / name).write_bytes((folder / name).read_bytes())
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, work / "gateway.log",
        "--tls-cert", str(work / "server.pem"), "--tls-key", str(work / "server.key"),
        "--tls-client-ca", str(folder / "ca.pem"), "--tls-client-auth", "required",
    )
    credentials = grpc.ssl_channel_credentials(
        (folder / "ca.pem").read_bytes(), (folder / "client.key").read_bytes(), (folder / "client.pem").read_bytes()
    )
    yield wait_secure_serving(gateway, credentials), work
    gateway.stop()


def _fresh(options=()):
    return [("grpc.use_local_subchannel_pool", 1), *options]  # a new connection, not a shared one


def test_mtls_requires_a_client_certificate(mtls, pki):
    gateway, _ = mtls
    folder = pki[0]
    ca = folder / "ca.pem"
    with ragserve.Client(
        gateway.address, root_certificates=ca, certificate_chain=folder / "client.pem", private_key=folder / "client.key",
        timeout=30, options=_fresh(),
    ) as client:
        assert client.embed(["with a client certificate"]).embeddings.shape == (1, 384)
    with ragserve.Client(gateway.address, root_certificates=ca, timeout=5, retries=0, options=_fresh()) as client:
        with pytest.raises(ragserve.UnavailableError):
            client.embed(["without a client certificate"])
    with ragserve.Client(
        gateway.address, root_certificates=ca, certificate_chain=folder / "stranger.pem", private_key=folder / "stranger.key",
        timeout=5, retries=0, options=_fresh(),
    ) as client:
        with pytest.raises(ragserve.UnavailableError):
            client.embed(["a certificate from another CA"])
    with ragserve.Client(gateway.address, timeout=5, retries=0, options=_fresh()) as client:  # plaintext
        with pytest.raises(ragserve.UnavailableError):
            client.embed(["plaintext"])


def test_rotated_certificate_is_served_without_a_restart(mtls, pki, tmp_path):
    gateway, work = mtls
    folder, ca = pki
    client_args = dict(certificate_chain=folder / "client.pem", private_key=folder / "client.key", timeout=30)
    assert common_name(peer_certificate(gateway.port, folder / "ca.pem")) == "gateway-1"
    pid = gateway.process.pid
    before = ragserve.Client(gateway.address, root_certificates=folder / "ca.pem", **client_args)
    assert before.embed(["before the rotation"]).embeddings.shape == (1, 384)

    # The same CA, a new certificate and key at the same paths.
    renewed = issue(ca, "gateway-2", server=True)
    renewed.write(work / "server.pem", work / "server.key")
    assert common_name(peer_certificate(gateway.port, folder / "ca.pem")) == "gateway-2"

    # A new CA: a fresh channel that trusts only the new CA is served; one that trusts only the old is refused.
    new_ca = make_ca("ragserve test CA 2")
    (tmp_path / "new-ca.pem").write_bytes(new_ca.cert_pem)
    moved = issue(new_ca, "gateway-3", server=True)
    moved.write(work / "server.pem", work / "server.key")
    seen = peer_certificate(gateway.port, tmp_path / "new-ca.pem")
    assert seen.fingerprint(hashes.SHA256()) == moved.cert.fingerprint(hashes.SHA256())
    with ragserve.Client(gateway.address, root_certificates=tmp_path / "new-ca.pem", options=_fresh(), **client_args) as client:
        assert client.embed(["after the rotation"]).embeddings.shape == (1, 384)
    with ragserve.Client(gateway.address, root_certificates=folder / "ca.pem", retries=0, options=_fresh(), **client_args) as client:
        with pytest.raises(ragserve.UnavailableError):
            client.embed(["trusting only the old CA"])
    # The connection opened before the rotation goes on; nothing restarted.
    assert before.embed(["on the old connection"]).embeddings.shape == (1, 384)
    before.close()
    assert gateway.process.pid == pid and gateway.process.poll() is None
    wait_until(lambda: [e.get("event") for e in gateway.log_events()].count("tls_certificate_reloaded") >= 2, 60, "two reload lines")


def test_half_written_pair_keeps_the_last_good_one(mtls, pki):
    gateway, work = mtls
    folder, ca = pki
    issue(ca, "gateway-4", server=True).write(work / "server.pem", work / "server.key")
    assert common_name(peer_certificate(gateway.port, folder / "ca.pem")) == "gateway-4"
    # A new key is in place, its certificate not yet: the pair does not match, the last good one is served.
    renewed = issue(ca, "gateway-5", server=True)
    (work / "server.key").write_bytes(renewed.key_pem)
    assert common_name(peer_certificate(gateway.port, folder / "ca.pem")) == "gateway-4"
    with ragserve.Client(
        gateway.address, root_certificates=folder / "ca.pem", certificate_chain=folder / "client.pem",
        private_key=folder / "client.key", timeout=30, options=_fresh(),
    ) as client:
        assert client.embed(["while the pair is half written"]).embeddings.shape == (1, 384)
    (work / "server.pem").write_bytes(renewed.cert_pem)
    assert common_name(peer_certificate(gateway.port, folder / "ca.pem")) == "gateway-5"
    wait_until(lambda: any(e.get("event") == "tls_reload_failed" for e in gateway.log_events()), 60, "the tls_reload_failed line")


def test_bad_tls_settings_stop_start_up(triton, pki, tmp_path):
    folder = pki[0]
    for args, message in (
        (["--tls-cert", str(folder / "server.pem")], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "client.key")], "--tls-cert"),
        (
            ["--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
             "--tls-client-ca", str(folder / "ca.pem"), "--tls-client-auth", "optional"],
            "optional",
        ),
        (["--api-keys-file", str(tmp_path / "missing.jsonl")], "does not exist"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "ragserve_server", "--triton-url", triton.grpc_url, "--triton-models", "minilm",
             "--port", "0", "--metrics-port", "0", *args],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr[-2000:])


# -- TLS from the gateway to Triton --------------------------------------------------------


class TlsTriton(TritonServer):
    """The bundled Triton with gRPC over mutual TLS (its HTTP port, used for readiness, stays plaintext)."""

    def __init__(self, *args, folder: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.folder = folder

    def command(self) -> list[str]:
        return super().command() + [
            "--grpc-use-ssl=true",
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={self.folder / 'server.pem'}",
            f"--grpc-server-key={self.folder / 'server.key'}",
            f"--grpc-root-cert={self.folder / 'ca.pem'}",
        ]


def test_gateway_speaks_mutual_tls_to_triton(triton, pki, tmp_path):
    folder = pki[0]
    secured = TlsTriton(
        triton.model_repository, triton.models, TritonPorts(free_port(), free_port(), free_port()), tmp_path / "triton", folder=folder
    )
    secured.start()
    try:
        secured.wait_ready(180)
        plain = subprocess.run(
            [sys.executable, "-m", "ragserve_server", "--triton-url", secured.grpc_url, "--triton-models", "minilm",
             "--port", "0", "--metrics-port", "0", "--on-no-replicas", "exit"],
            capture_output=True, text=True, timeout=60,
        )
        assert plain.returncode != 0 and "no Triton replica answers" in plain.stderr, plain.stderr[-2000:]
        gateway = GatewayProcess(
            secured.grpc_url, secured.models, tmp_path / "gateway.log",
            "--triton-tls-ca", str(folder / "ca.pem"),
            "--triton-tls-cert", str(folder / "client.pem"), "--triton-tls-key", str(folder / "client.key"),
        )
        try:
            gateway.wait_serving()
            with ragserve.Client(gateway.address, timeout=30) as client:
                assert client.embed(["over TLS to Triton"]).embeddings.shape == (1, 384)
        finally:
            gateway.stop()
    finally:
        secured.stop()
