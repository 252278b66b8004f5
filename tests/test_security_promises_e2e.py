"""Security promises of docs/security.md and the README checked against real processes (issue 25):

- `--reflection open` (the default) together with a keys file: reflection answers without a key
  while the services still need one; `--reflection off` answers UNIMPLEMENTED, key or not.
- a keys file that turns invalid keeps the last good keys and logs `api_keys_reload_failed`.
- the client CA bundle (`--tls-client-ca`) is re-read on change: a certificate from the new CA
  is taken on a fresh connection, one from the old CA is refused, no restart.
- `--max-connection-age` closes old connections: the client's connection is replaced and its
  calls keep succeeding.
- TLS to Triton with a CA only (`--triton-tls-ca`, no client certificate).

Certificates and helpers come from test_security_e2e.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import ragserve
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer
from support import GatewayProcess, free_port, wait_until
from test_security_e2e import issue, make_ca, new_key, wait_secure_serving

pytestmark = pytest.mark.integration


def _fresh():
    return [("grpc.use_local_subchannel_pool", 1)]  # a new connection, not a shared one


def _list_services(address: str, metadata=()) -> set[str]:
    with grpc.insecure_channel(address, options=_fresh()) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=list(metadata))
        return {s.name for s in answer.list_services_response.service}


def _replace(path: Path, text: str) -> None:
    """Replaces a file atomically, as a deployment would."""
    staging = path.with_suffix(".staging")
    staging.write_text(text)
    staging.replace(path)


# -- reflection open with a keys file; a keys file that turns invalid ------------------------


@pytest.fixture(scope="module")
def open_keyed(triton, tmp_path_factory):
    work = tmp_path_factory.mktemp("open_keyed")
    keys_file = work / "keys.jsonl"
    keys_file.write_text("# ragserve API keys\n")
    key = new_key(keys_file, "search-backend", "ragserve.v1.Embed")
    gateway = GatewayProcess(triton.grpc_url, triton.models, work / "gateway.log", "--api-keys-file", str(keys_file))
    yield gateway.wait_serving(), key, keys_file
    gateway.stop()


def test_reflection_open_with_a_keys_file(open_keyed):
    gateway, key, _ = open_keyed
    assert "ragserve.v1.Embed" in _list_services(gateway.address)  # no key needed for reflection
    with ragserve.Client(gateway.address, timeout=30) as client:
        with pytest.raises(ragserve.UnauthenticatedError):
            client.embed(["the services still need a key"])
    with ragserve.Client(gateway.address, api_key=key, timeout=30) as client:
        assert client.embed(["with the key"]).embeddings.shape == (1, 384)


def test_invalid_keys_file_keeps_the_last_good_keys(open_keyed):
    gateway, key, keys_file = open_keyed
    good = keys_file.read_text()
    failures_before = sum(e.get("event") == "api_keys_reload_failed" for e in gateway.log_events())
    try:
        # A typo while editing: the last good keys stay, the failure is logged with the line.
        # The file is checked on the calls themselves (at most once a second): keep calling
        # with the good key (each call succeeds) until the failure is logged.
        _replace(keys_file, good + '{"name": "half-typed", "sha256": \n')
        with ragserve.Client(gateway.address, api_key=key, timeout=30) as client:
            def reload_failed():
                assert client.embed(["the last good keys"]).embeddings.shape == (1, 384)
                return [e for e in gateway.log_events() if e.get("event") == "api_keys_reload_failed"][failures_before:] or None
            events = wait_until(reload_failed, 60, "the api_keys_reload_failed line", interval=0.2)
        assert "line" in events[0].get("error", ""), events[0]
        assert events[0].get("keeping") == 1, events[0]
        with ragserve.Client(gateway.address, api_key=key, timeout=30) as client:
            assert client.embed(["the last good keys"]).embeddings.shape == (1, 384)
        with ragserve.Client(gateway.address, timeout=30) as client:
            with pytest.raises(ragserve.UnauthenticatedError):
                client.embed(["still keyed"])
    finally:
        _replace(keys_file, good)
    # The file is good again, with a new key: it is taken.
    later = new_key(keys_file, "added-after-the-typo", "ragserve.v1.Embed")
    with ragserve.Client(gateway.address, api_key=later, timeout=30) as client:
        def accepted():
            try:
                return client.embed(["after the fix"]).embeddings.shape == (1, 384)
            except ragserve.UnauthenticatedError:
                return False
        wait_until(accepted, 60, "the key added after the fix to be accepted", interval=0.2)


# -- reflection off; connections closed by age ----------------------------------------------


@pytest.fixture(scope="module")
def aged(triton, tmp_path_factory):
    work = tmp_path_factory.mktemp("aged")
    keys_file = work / "keys.jsonl"
    keys_file.write_text("# ragserve API keys\n")
    key = new_key(keys_file, "everything")
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, work / "gateway.log",
        "--api-keys-file", str(keys_file), "--reflection", "off",
        "--max-connection-age", "1", "--max-connection-age-grace", "1",
    )
    yield gateway.wait_serving(), key
    gateway.stop()


def test_reflection_off_is_unimplemented_with_or_without_a_key(aged):
    gateway, key = aged
    for metadata in ((), [("authorization", f"Bearer {key}")]):
        with pytest.raises(grpc.RpcError) as refused:
            _list_services(gateway.address, metadata)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, metadata
        assert "reflection is off" in refused.value.details()


def _connections_to(port: int) -> set[int]:
    """Local ports of this process's established TCP connections to `port`."""
    return {
        c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_max_connection_age_replaces_old_connections(aged):
    gateway, key = aged
    with ragserve.Client(gateway.address, api_key=key, timeout=30, options=_fresh()) as client:
        assert client.embed(["first"]).embeddings.shape == (1, 384)
        first = _connections_to(gateway.port)
        assert len(first) == 1, first
        seen = set(first)

        def replaced():
            assert client.embed(["again"]).embeddings.shape == (1, 384)  # every call succeeds
            now = _connections_to(gateway.port)
            seen.update(now)
            return now and not (now & first)

        # Age 1 s (+10 % jitter) and 1 s of grace: the first connection is gone within seconds.
        wait_until(replaced, 60, "the first connection to be closed by age and replaced", interval=0.2)
        assert len(seen) >= 2


# -- the client CA bundle re-read on change -------------------------------------------------


def test_client_ca_bundle_is_reread_on_change(triton, tmp_path):
    old_ca, new_ca = make_ca("clients CA 1"), make_ca("clients CA 2")
    server_ca = make_ca("server CA")
    (tmp_path / "server-ca.pem").write_bytes(server_ca.cert_pem)
    issue(server_ca, "gateway", server=True).write(tmp_path / "server.pem", tmp_path / "server.key")
    issue(old_ca, "old-client", server=False).write(tmp_path / "old.pem", tmp_path / "old.key")
    issue(new_ca, "new-client", server=False).write(tmp_path / "new.pem", tmp_path / "new.key")
    clients_ca = tmp_path / "clients-ca.pem"
    clients_ca.write_bytes(old_ca.cert_pem)
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, tmp_path / "gateway.log",
        "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
        "--tls-client-ca", str(clients_ca), "--tls-client-auth", "required",
    )

    def embeds(name: str) -> bool:
        with ragserve.Client(
            gateway.address, root_certificates=tmp_path / "server-ca.pem", certificate_chain=tmp_path / f"{name}.pem",
            private_key=tmp_path / f"{name}.key", timeout=10, retries=0, options=_fresh(),
        ) as client:
            try:
                return client.embed([f"{name} client"]).embeddings.shape == (1, 384)
            except ragserve.UnavailableError:
                return False

    try:
        wait_secure_serving(gateway, grpc.ssl_channel_credentials(
            (tmp_path / "server-ca.pem").read_bytes(), (tmp_path / "old.key").read_bytes(), (tmp_path / "old.pem").read_bytes()
        ))
        pid = gateway.process.pid
        assert embeds("old") and not embeds("new")
        _replace(clients_ca, new_ca.cert_pem.decode())
        wait_until(lambda: embeds("new"), 60, "a certificate from the new client CA to be taken", interval=0.2)
        assert not embeds("old")
        assert gateway.process.pid == pid and gateway.process.poll() is None
    finally:
        gateway.stop()


# -- TLS to Triton with a CA only --------------------------------------------------------------


class ServerTlsTriton(TritonServer):
    """The bundled Triton with gRPC over TLS, no client certificate asked (HTTP stays plaintext)."""

    def __init__(self, *args, folder: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.folder = folder

    def command(self) -> list[str]:
        return super().command() + [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={self.folder / 'triton.pem'}",
            f"--grpc-server-key={self.folder / 'triton.key'}",
        ]


def test_gateway_speaks_tls_to_triton_with_a_ca_only(triton, tmp_path):
    ca = make_ca("triton CA")
    (tmp_path / "triton-ca.pem").write_bytes(ca.cert_pem)
    issue(ca, "triton", server=True).write(tmp_path / "triton.pem", tmp_path / "triton.key")
    stranger = make_ca("another CA")
    (tmp_path / "stranger-ca.pem").write_bytes(stranger.cert_pem)
    secured = ServerTlsTriton(
        triton.model_repository, triton.models, TritonPorts(free_port(), free_port(), free_port()), tmp_path / "triton", folder=tmp_path
    )
    secured.start()
    try:
        secured.wait_ready(180)
        gateway = GatewayProcess(secured.grpc_url, secured.models, tmp_path / "gateway.log", "--triton-tls-ca", str(tmp_path / "triton-ca.pem"))
        try:
            gateway.wait_serving()
            with ragserve.Client(gateway.address, timeout=30) as client:
                assert client.embed(["over TLS to Triton, CA only"]).embeddings.shape == (1, 384)
        finally:
            gateway.stop()
        # A CA that Triton's certificate does not chain to: no replica answers.
        refused = subprocess.run(
            [sys.executable, "-m", "ragserve_server", "--triton-url", secured.grpc_url, "--triton-models", "minilm",
             "--port", "0", "--metrics-port", "0", "--on-no-replicas", "exit", "--triton-tls-ca", str(tmp_path / "stranger-ca.pem")],
            capture_output=True, text=True, timeout=60,
        )
        assert refused.returncode != 0 and "no Triton replica answers" in refused.stderr, refused.stderr[-2000:]
    finally:
        secured.stop()
