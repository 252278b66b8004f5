"""Gateway settings: one setting = one flag = one environment variable = one help line.

Built once in `main` (never at import time): `Settings.from_args(argv)`. Every flag
`--foo-bar` has the twin `RAGSERVE_FOO_BAR`; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ragserve_server.paths import REPO_ROOT


@dataclass(frozen=True)
class Settings:
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address the gateway listens on; an address other than loopback needs --api-keys-file or --tls-cert, or --trust-network"},
    )
    trust_network: str = field(
        default="no",
        metadata={"help": "yes: serve a non-loopback --host without keys and without TLS (a network only trusted callers reach); no: refuse to start so"},
    )
    port: int = field(default=50051, metadata={"help": "gateway gRPC port (0 = any free port)"})
    metrics_port: int = field(default=9000, metadata={"help": "Prometheus metrics HTTP port (0 = off)"})
    health_port: int = field(
        default=0,
        metadata={"help": "a plaintext gRPC port serving only grpc.health.v1, for probes that cannot speak TLS (the kubelet's); 0 = off (health is on --port as well)"},
    )
    triton_url: str = field(
        default="",
        metadata={"help": "external Triton replicas: host:port[,host:port...], dns:///name:port (the system resolver; e.g. a headless Service) or dns://DNS_SERVER_IP[:port]/name:port (that DNS server asked for A/AAAA), re-resolved every --health-poll-interval; empty = launch the bundled Triton"},
    )
    on_no_replicas: str = field(
        default="wait",
        metadata={"help": "when no Triton replica answers at start-up: wait (serve NOT_SERVING until one is ready) or exit"},
    )
    max_connection_age: float = field(
        default=300.0,
        metadata={"help": "seconds after which the gateway asks a client connection to close (GOAWAY), so clients re-balance over gateways; 0 = never"},
    )
    max_connection_age_grace: float = field(
        default=120.0, metadata={"help": "seconds calls on a connection past its max age get to finish"}
    )
    triton_http_port: int = field(default=8000, metadata={"help": "bundled Triton HTTP port"})
    triton_grpc_port: int = field(default=8001, metadata={"help": "bundled Triton gRPC port"})
    triton_metrics_port: int = field(default=8002, metadata={"help": "bundled Triton metrics port"})
    model_repository: Path = field(
        default=REPO_ROOT / "model_repository", metadata={"help": "Triton model repository of the bundled Triton"}
    )
    device: str = field(
        default="cpu",
        metadata={"help": "cpu, or gpu: the bundled Triton runs a GPU repository rendered from the registry (PyTorch fp16 on CUDA); with --triton-url, the repository of `make engines`"},
    )
    triton_models: str = field(
        default="minilm,minilm_tokens,smollm2",
        metadata={"help": "comma-separated built-in models to serve, by Triton model name (server/ragserve_server/models/registry.py)"},
    )
    cross_encoders: str = field(
        default="",
        metadata={"help": "cross-encoder rerankers as name=model_dir,... (model repository entries built by scripts/export_cross_encoder.py)"},
    )
    embedding_models: str = field(
        default="",
        metadata={"help": "more embedding models as name=model_dir,... (model repository entries built by scripts/export_encoder.py)"},
    )
    default_reranker: str = field(default="", metadata={"help": "reranker used when a request names none (empty = the bi-encoder)"})
    max_concurrent_requests: int = field(
        default=512, metadata={"help": "interactive calls admitted at once; beyond that RESOURCE_EXHAUSTED at once, with a retry hint"}
    )
    lanes: str = field(
        default="two",
        metadata={"help": "two: bulk work has its own admission budget and a lower Triton priority; one: everything shares the interactive lane (for comparison)"},
    )
    max_bulk_requests: int = field(
        default=64,
        metadata={"help": "bulk calls (PRIORITY_BULK) and EmbedStream messages admitted at once: a separate budget from interactive calls"},
    )
    max_inputs_per_call: int = field(default=2048, metadata={"help": "most texts in one Embed call"})
    max_documents_per_call: int = field(default=1000, metadata={"help": "most documents in one Rerank call"})
    max_message_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata={"help": "largest gRPC request message the gateway reads, in bytes; a larger one is answered RESOURCE_EXHAUSTED (the largest Embed call, 2048 texts of 512 tokens, is about 4 MiB)"},
    )
    max_http_body_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "largest HTTP request body, in bytes (by Content-Length and as it streams in); a larger one is answered 413"},
    )
    http_receive_timeout: float = field(
        default=10.0, metadata={"help": "seconds an HTTP request's headers, and then its body, may take to arrive (slow senders are cut off: 408 or a closed connection)"}
    )
    http_max_connections: int = field(
        default=1024, metadata={"help": "open HTTP connections; beyond that requests are answered 503 and the connection closed"}
    )
    http_keep_alive: float = field(default=5.0, metadata={"help": "seconds an idle HTTP keep-alive connection stays open"})
    grpc_max_concurrent_streams: int = field(
        default=256, metadata={"help": "gRPC calls one client connection may have open at once (HTTP/2 max_concurrent_streams)"}
    )
    max_open_streams: int = field(
        default=64, metadata={"help": "EmbedStream calls open at once in this gateway (each message still takes a bulk permit); beyond that RESOURCE_EXHAUSTED"}
    )
    coalesce_in_flight: int = field(
        default=2,
        metadata={"help": "Triton requests in flight per encoder model and shape before the gateway joins further calls of that shape into one request (coalescer.py); 0 = off, every call is its own request"},
    )
    bulk_rows: int = field(
        default=-1,
        metadata={"help": "most rows of one bulk Triton request (EmbedStream messages, PRIORITY_BULK calls): a bigger one is cut, so an interactive query never waits behind a long bulk execution (coalescer.py); 0 = the model's max rows; -1 = auto (4 with --device cpu, 0 on gpu)"},
    )
    bulk_in_flight: int = field(
        default=-1,
        metadata={"help": "bulk Triton requests in flight per encoder model in this gateway: fewer than the model's instances leaves one free for interactive queries (coalescer.py); 0 = no limit; -1 = auto (1 with --device cpu, 0 on gpu)"},
    )
    workers: int = field(
        default=0,
        metadata={"help": "gateway processes sharing the gRPC and HTTP ports (SO_REUSEPORT; the kernel spreads connections): one is capped by its core; each serves metrics on --metrics-port + its index and takes 1/N of the admission budgets (workers.py); 0 = auto: 1 with --device cpu (the model needs the cores), with --device gpu one per core left after the bundled Triton's 2 (all cores with --triton-url)"},
    )
    worker_index: int = field(default=0, metadata={"help": "set by worker 0 for the workers it starts; leave 0"})
    event_loop: str = field(
        default="uvloop",
        metadata={"help": "the event loop gRPC, HTTP and the services run on: uvloop (libuv; less CPU a call) or asyncio (the standard library's)"},
    )
    tokenizer_threads: int = field(default=1, metadata={"help": "threads that tokenize off the event loop"})
    inline_tokenize_chars: int = field(
        default=512,
        metadata={"help": "an Embed call whose texts total at most this many characters is tokenized on the event loop: for a query the hop to a tokenizer thread costs more than the work (bench/embed_bench.py); 0 = always on a thread"},
    )
    triton_ready_timeout: float = field(default=180.0, metadata={"help": "seconds to wait for the bundled Triton to be ready"})
    triton_restart_attempts: int = field(
        default=5, metadata={"help": "restarts in a row of a dead or stuck bundled Triton before the gateway exits non-zero"}
    )
    triton_restart_backoff: float = field(
        default=1.0, metadata={"help": "seconds before the first restart of the bundled Triton, doubled per attempt (max 30)"}
    )
    triton_stuck_seconds: float = field(
        default=30.0, metadata={"help": "a bundled Triton alive but not ready this long is killed and restarted"}
    )
    health_poll_interval: float = field(default=1.0, metadata={"help": "seconds between Triton readiness checks"})
    triton_stats_interval: float = field(
        default=5.0, metadata={"help": "seconds between reads of Triton's batch statistics (ragserve_triton_batch_size)"}
    )
    drain_seconds: float = field(default=10.0, metadata={"help": "grace period for in-flight calls on SIGTERM"})
    tls_cert: str = field(default="", metadata={"help": "TLS: the gateway's certificate chain (PEM file), re-read when it changes; empty = plaintext"})
    tls_key: str = field(default="", metadata={"help": "TLS: the private key of --tls-cert (PEM file, unencrypted)"})
    tls_client_ca: str = field(default="", metadata={"help": "mTLS: CA bundle (PEM) that client certificates must chain to; empty = no client certificates"})
    tls_client_auth: str = field(default="required", metadata={"help": "mTLS: required; optional is refused (gRPC Python cannot ask for a client certificate without requiring it)"})
    api_keys_file: str = field(default="", metadata={"help": "API keys (JSON lines of name, sha256, services; python -m ragserve_server.security.keys new), re-read when it changes; empty = no keys needed"})
    reflection: str = field(default="open", metadata={"help": "server reflection: open, keyed (any valid API key) or off"})
    triton_tls_ca: str = field(default="", metadata={"help": "TLS to --triton-url: CA bundle (PEM) that Triton's certificate chains to; empty = plaintext"})
    triton_tls_cert: str = field(default="", metadata={"help": "mTLS to Triton: the gateway's client certificate (PEM file)"})
    triton_tls_key: str = field(default="", metadata={"help": "mTLS to Triton: the key of --triton-tls-cert (PEM file)"})
    http_port: int = field(
        default=0, metadata={"help": "HTTP port of the OpenAI/Cohere-compatible API (/v1/embeddings, /v1/chat/completions, /v1/completions, /v1/rerank, /v1/models, /health); 0 = off"}
    )
    tracing: str = field(
        default="off",
        metadata={"help": "OpenTelemetry traces: off, or on (OTLP exporter configured by the standard OTEL_* variables; OTEL_SDK_DISABLED=true wins)"},
    )
    triton_trace_url: str = field(
        default="", metadata={"help": "bundled Triton: export its OpenTelemetry spans over OTLP/HTTP to host:port/v1/traces (joining the gateway's traces); empty = off"}
    )
    triton_trace_rate: int = field(default=1, metadata={"help": "bundled Triton: trace one request in this many (with --triton-trace-url)"})
    log_format: str = field(default="auto", metadata={"help": "json, console, or auto (console when a terminal)"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def is_loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="ragserve-server", description="ragserve gRPC gateway")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env_name = "RAGSERVE_" + f.name.upper()
            kind = {"int": int, "float": float, "Path": Path}.get(str(f.type), str)
            default = kind(env[env_name]) if env_name in env else f.default
            parser.add_argument(flag, type=kind, default=default, help=f"{f.metadata['help']} [env {env_name}] (default: %(default)s)")
        return cls(**vars(parser.parse_args(argv)))
