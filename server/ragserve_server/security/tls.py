"""TLS: the gateway's server credentials (certificates re-read on change) and the gateway's
channel credentials to a remote Triton.

Server side, gRPC's dynamic SSL credentials ask `CertificateFiles.fetch` for the certificate
configuration at every TLS handshake; it compares the files' mtimes (a few stat calls) and
hands over a new configuration only when they changed and the new certificate and key load
and match. New connections get the new certificate; open connections keep theirs until they
close (the gateway's --max-connection-age bounds how long). A half-written pair is not taken:
it is tried again on the next handshake, and the last good pair is served meanwhile.

The HTTP front serves the same files (`https_context`): its own CertificateFiles re-reads
them the same way, at each TLS handshake (the context's SNI callback, called for every
ClientHello), and hands the new context to the connection.

Client certificates (mTLS, --tls-client-ca): gRPC Python can only require and verify one or
not ask for one (grpc_ssl_client_certificate_request_type has no optional mode in its API), so
--tls-client-auth takes `required` only and `optional` is refused with that reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

log = structlog.get_logger("ragserve.tls")

CLIENT_AUTH_MODES = ("required", "optional")


class TlsConfigError(ValueError):
    """TLS settings that cannot be served; the message names the setting or file."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    raise TlsConfigError("encrypted private keys are not supported (gRPC reads PEM keys without a password)")


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate of a PEM chain (as `openssl x509 -fingerprint -sha256`)."""
    match = _PEM_CERT.search(cert_pem)
    if match is None:
        raise TlsConfigError("no PEM certificate found")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))).hexdigest()


@dataclass
class _Loaded:
    signature: tuple
    config: grpc.ServerCertificateConfiguration
    fingerprint: str
    context: ssl.SSLContext  # the same material, for the HTTP front


class CertificateFiles:
    """The server certificate chain, its key and (for mTLS) the client CA bundle, as files."""

    def __init__(self, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._current = self._load()  # raises TlsConfigError at start-up
        self._rejected: tuple | None = None

    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])

    def _signature(self) -> tuple:
        signature = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
                continue
            signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(signature)

    def _load(self) -> _Loaded:
        before = self._signature()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"--tls-cert {self.cert} / --tls-key {self.key}: {exc}") from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise TlsConfigError(f"--tls-client-ca {self.client_ca}: {exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        client_ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        if self._signature() != before:
            raise TlsConfigError("the certificate files changed while being read")
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
        return _Loaded(before, config, fingerprint(cert), context)

    @property
    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._current.config

    @property
    def fingerprint(self) -> str:
        return self._current.fingerprint

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher (called per handshake, on a gRPC thread):
        None keeps the current configuration."""
        signature = self._signature()
        if signature == self._current.signature or signature == self._rejected:
            return None
        try:
            loaded = self._load()
        except TlsConfigError as exc:
            if "changed while being read" not in str(exc):
                self._rejected = signature  # reported once per change, retried when the files change again
                log.error("tls_reload_failed", error=str(exc), serving=self._current.fingerprint)
            return None
        self._current = loaded
        log.info("tls_certificate_reloaded", cert=str(self.cert), fingerprint=loaded.fingerprint)
        return loaded.config

    def current_context(self) -> ssl.SSLContext:
        """The HTTP front's SSL context for a new handshake (re-read like `fetch`)."""
        self.fetch()
        return self._current.context


def https_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext | None:
    """The HTTP front's server context on the gRPC port's files; None when TLS is off. New
    connections get re-read files: the SNI callback (run for every ClientHello, SNI or not)
    switches the connection to the context of the current files."""
    if not cert:
        return None
    files = CertificateFiles(cert, key, client_ca or None)
    base = files._current.context

    def on_hello(connection: ssl.SSLObject, server_name, context) -> None:
        current = files.current_context()
        if current is not connection.context:
            connection.context = current
        return None

    base.sni_callback = on_hello
    return base


def server_credentials(cert: str, key: str, client_ca: str = "", client_auth: str = "required") -> grpc.ServerCredentials | None:
    """Dynamic SSL credentials for --tls-cert/--tls-key[/--tls-client-ca]; None when TLS is off."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise TlsConfigError("--tls-cert and --tls-key go together")
    if client_auth not in CLIENT_AUTH_MODES:
        raise TlsConfigError(f"--tls-client-auth {client_auth!r}: use {' or '.join(CLIENT_AUTH_MODES)}")
    if client_ca and client_auth == "optional":
        raise TlsConfigError(
            "--tls-client-auth optional: gRPC Python can require a client certificate or not ask for one, "
            "nothing in between; use required, or authenticate callers without certificates by API key (--api-keys-file)"
        )
    files = CertificateFiles(cert, key, client_ca or None)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch, require_client_authentication=bool(client_ca))


def bind(server: grpc.aio.Server, address: str, settings) -> int:
    """Binds `address` with TLS when --tls-cert is set, in plaintext otherwise; the bound port."""
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_client_auth)
    if credentials is None:
        return server.add_insecure_port(address)
    log.info("tls_on", cert=settings.tls_cert, client_certificates="required" if settings.tls_client_ca else "not asked")
    return server.add_secure_port(address, credentials)


def triton_channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """Channel credentials to a remote Triton (--triton-tls-ca, optional --triton-tls-cert/--triton-tls-key
    for mTLS); None: plaintext. Read once: a new CA or client certificate takes a gateway restart."""
    if not ca:
        if cert or key:
            raise TlsConfigError("--triton-tls-cert/--triton-tls-key need --triton-tls-ca")
        return None
    if bool(cert) != bool(key):
        raise TlsConfigError("--triton-tls-cert and --triton-tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--triton-tls-ca"),
        private_key=_read(key, "--triton-tls-key") if key else None,
        certificate_chain=_read(cert, "--triton-tls-cert") if cert else None,
    )


def check_settings(settings) -> None:
    """Raises TlsConfigError for gateway TLS settings that cannot be served (before anything starts)."""
    server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_client_auth)
