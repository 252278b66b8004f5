"""Channel set-up shared by `Client` and `AsyncClient`: credentials, options (balancing, the
retry policy), several connections, and the metadata sent with every call."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from ragserve.v1 import embed_pb2, models_pb2, rerank_pb2, tokenize_pb2

Pem = bytes | str | os.PathLike


# Calls the SDK retries (idempotent: the same request gives the same answer and changes
# nothing); Generate and the streams are never retried.
RETRIED_METHODS = (
    (embed_pb2.DESCRIPTOR.services_by_name["Embed"].full_name, "Embed"),
    (rerank_pb2.DESCRIPTOR.services_by_name["Rerank"].full_name, "Rerank"),
    (models_pb2.DESCRIPTOR.services_by_name["Models"].full_name, "ListModels"),
    (tokenize_pb2.DESCRIPTOR.services_by_name["Tokenize"].full_name, "Tokenize"),
    (tokenize_pb2.DESCRIPTOR.services_by_name["Tokenize"].full_name, "Detokenize"),
)
DEFAULT_RETRIES = 3
# A target that resolves to several gateways (a headless Service, an ipv4: list) gets its
# calls spread over all of them; gRPC's own default (pick_first) would send every call to one.
# With one address the two behave the same.
DEFAULT_LOAD_BALANCING = "round_robin"
MAX_RETRIES = 4  # gRPC caps maxAttempts at 5
# gRPC replays a call from a buffer; a request larger than the buffer is not retried (default 256 KiB).
RETRY_BUFFER_BYTES = 16 * 1024 * 1024


def service_config(load_balancing: str | None, retries: int) -> dict | None:
    """The channel's service config: the balancing policy and the retry policy, one JSON.

    Retries use gRPC's own policy (gRFC A6): UNAVAILABLE and RESOURCE_EXHAUSTED are retried
    up to `retries` times after a random wait in [0, 0.1 s x 2^n] (at most 5 s), all within
    the call's deadline; a server's `grpc-retry-pushback-ms` trailer replaces that wait
    (a negative value stops the retries)."""
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be an int from 0 (off) to {MAX_RETRIES}, got {retries!r}")
    config: dict = {}
    if load_balancing:
        if load_balancing not in ("round_robin", "pick_first"):
            raise ValueError(f"load_balancing must be 'round_robin' or 'pick_first', got {load_balancing!r}")
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    return config or None


def channel_options(
    load_balancing: str | None, options: Sequence[tuple[str, object]], retries: int = DEFAULT_RETRIES
) -> list[tuple[str, object]]:
    """gRPC channel options: the caller's, then the service config (`load_balancing` and
    `retries`) unless the caller gave its own `grpc.service_config` (theirs wins, whole)."""
    result = list(options)
    given = {name for name, _ in result}
    config = service_config(load_balancing, retries)
    if config is not None and "grpc.service_config" not in given:
        result.append(("grpc.service_config", json.dumps(config)))
    if retries and "grpc.per_rpc_retry_buffer_size" not in given:
        result.append(("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES))
    return result


def _pem(value: bytes | str | os.PathLike | None, name: str) -> bytes | None:
    """PEM bytes as given, or read from a file path (str or Path)."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {value}: {exc.strerror or exc}") from None


def channel_credentials(
    tls: bool,
    root_certificates: bytes | str | os.PathLike | None,
    private_key: bytes | str | os.PathLike | None,
    certificate_chain: bytes | str | os.PathLike | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel. TLS is on with `tls=True` or any
    certificate argument; without `root_certificates` gRPC's default roots verify the server."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate for mTLS)")
    if not (tls or root_certificates is not None or private_key is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root_certificates"),
        private_key=_pem(private_key, "private_key"),
        certificate_chain=_pem(certificate_chain, "certificate_chain"),
    )


def call_metadata(metadata: Sequence[tuple[str, str]], api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the caller's, and the API key as a bearer token."""
    if api_key is None:
        return tuple(metadata)
    if not isinstance(api_key, str) or not api_key.strip() or any(c in api_key for c in "\r\n"):
        raise ValueError("api_key must be a non-empty one-line string")
    return (*metadata, ("authorization", f"Bearer {api_key.strip()}"))


def settings(tls, root_certificates, private_key, certificate_chain, load_balancing, retries, options):
    """A client's channel credentials (None: plaintext) and options, from its constructor's arguments."""
    credentials = channel_credentials(tls, root_certificates, private_key, certificate_chain)
    return credentials, channel_options(load_balancing, options, retries)


def open_channels(open_one, connections: int, channel_options: list) -> list:
    """`connections` channels, each with its own TCP connection when there are several (gRPC
    otherwise shares one connection between channels of the same target and options)."""
    if connections < 1:
        raise ValueError(f"connections must be 1 or more, got {connections}")
    if connections == 1:
        return [open_one(channel_options)]
    return [open_one([*channel_options, ("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)]
