"""The gateway factory: builds the grpc.aio server and returns it with its bound port."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragserve.v1 import embed_pb2_grpc, generate_pb2_grpc, models_pb2_grpc, rerank_pb2_grpc, tokenize_pb2_grpc
from ragserve_server.security import tls
from ragserve_server.supervision import drain
from ragserve_server.calls.admission import Admission
from ragserve_server.security.auth import Authenticator
from ragserve_server.security.keys import SERVICES
from ragserve_server.calls.call_scope import CallGuard
from ragserve_server.models.catalog import BI_ENCODER, CROSS_ENCODER, EMBEDDING, GENERATION, LLM_RERANKER, MAXSIM, Catalog
from ragserve_server.encoding.encoder import EncoderRunner
from ragserve_server.encoding.coalescer import bulk_gate
from ragserve_server.backend.health import HealthMonitor
from ragserve_server.transport.http.routes import HttpFront
from ragserve_server.transport.http.server import HttpServer
from ragserve_server.transport.grpc_methods import GatewayMethods
from ragserve_server.observability.metrics import GatewayMetrics
from ragserve_server.services.embed import EmbedService
from ragserve_server.services.generate import GenerateService
from ragserve_server.services.models import ModelsService
from ragserve_server.services.rerank import RerankService
from ragserve_server.services.rerank_llm import LlmRerankers
from ragserve_server.services.tokenize import TokenizeService
from ragserve_server.settings import Settings
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.backend.protocol import InferenceBackend

SERVICE_NAMES = {short.lower(): full for short, full in SERVICES.items()}  # security/keys.py's one list


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    health: HealthMonitor
    backend: InferenceBackend
    executor: ThreadPoolExecutor
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    background: list[asyncio.Task] = field(default_factory=list)
    http: HttpServer | None = None  # the OpenAI/Cohere-compatible HTTP front (--http-port)
    health_server: grpc.aio.Server | None = None  # plaintext, health only (--health-port)

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def stop(self, grace: float) -> None:
        """Drains within `grace` seconds: health goes NOT_SERVING; the calls in flight end and their
        answers are delivered (supervision/drain.py, at most half of `grace`); then GOAWAY refuses
        new calls and the calls still running get the rest."""
        await self.health.shutdown()
        http_stopped = asyncio.create_task(self.http.stop(grace)) if self.http is not None else None
        # Before GOAWAY, the calls in flight end and their answers reach the callers' kernels:
        # gRPC closes a connection as soon as its last answer is handed to the kernel, and a
        # caller still reading then gets a RST that drops the answer's tail (drain.py).
        loop = asyncio.get_running_loop()
        started = loop.time()
        await drain.settle(self.port, lambda: drain.total(self.metrics.in_flight), grace * drain.SETTLE_SHARE)
        await self.server.stop(max(grace - (loop.time() - started), 0.0))
        if self.health_server is not None:
            await self.health_server.stop(0)
        if http_stopped is not None:
            await http_stopped
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        self.metrics.close()
        await self.backend.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def create_gateway(settings: Settings, backend: InferenceBackend, catalog: Catalog) -> Gateway:
    """Builds, binds and starts the gateway; `settings.port` 0 binds any free port."""
    executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
    if settings.lanes not in ("one", "two"):
        raise ValueError(f"--lanes {settings.lanes!r}: use two or one")
    admission = Admission(settings.max_concurrent_requests, settings.max_bulk_requests, shared=settings.lanes == "one")
    metrics = GatewayMetrics()  # served over HTTP by main (--metrics-port); tests read metrics.registry
    auth = Authenticator.from_settings(settings.api_keys_file, settings.reflection)
    # One guard for gRPC and HTTP: the key check, per-key quotas, admission, errors, metrics.
    guard = CallGuard(admission, on_finish=metrics.call_finished, on_start=metrics.call_started, auth=auth if auth.keys else None)
    # Each method wrapped once with the guard (transport/grpc_methods.py): no interceptor runs per call.
    methods = GatewayMethods(guard, max_open_streams=settings.max_open_streams, auth=auth)
    server = grpc.aio.server(
        options=[
            # HTTP/2 streams (calls) one connection may have open at once: one client cannot
            # open thousands of calls on one connection.
            ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
            # Off, so a second gateway on a taken port fails to bind; on for --workers (workers.py).
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Clients may keep idle connections alive with pings every 10 s or more (the SDK's
            # keepalive options); more often is answered with GOAWAY too_many_pings.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Long-lived HTTP/2 connections defeat L4 balancing over several gateways: a
            # connection past its age is asked to close (GOAWAY) and the client reconnects,
            # re-balancing; calls on it get the grace period to finish.
            *(
                [
                    ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
                ]
                if settings.max_connection_age > 0
                else []
            ),
        ],
    )
    if hasattr(backend, "stats"):  # a ReplicaSet: per-replica metrics
        metrics.replicas.source = backend
    tokenizers = {
        m.name: EncoderTokenizer(m.model_dir / "tokenizer.json", m.max_input_tokens)
        for m in catalog.by_kind(EMBEDDING) + catalog.by_kind(CROSS_ENCODER)
    }
    bulk_rows, bulk_in_flight = bulk_gate(settings.bulk_rows, settings.bulk_in_flight, settings.device)
    encoder = EncoderRunner(backend, coalesce_in_flight=settings.coalesce_in_flight, bulk_rows=bulk_rows, bulk_in_flight=bulk_in_flight)
    metrics.coalescing.source = encoder.coalescer
    embed = EmbedService(
        catalog, tokenizers, encoder, executor, settings.max_inputs_per_call, admission,
        inline_tokenize_chars=settings.inline_tokenize_chars,
    )
    embed_pb2_grpc.add_EmbedServicer_to_server(embed, methods)
    models = ModelsService(catalog)
    models_pb2_grpc.add_ModelsServicer_to_server(models, methods)
    tokenize_pb2_grpc.add_TokenizeServicer_to_server(TokenizeService(catalog, tokenizers, executor, settings.max_inputs_per_call), methods)
    generators = catalog.by_kind(GENERATION)
    generate = rerank = None
    if generators:
        generate = GenerateService(catalog, backend, executor)
        generate_pb2_grpc.add_GenerateServicer_to_server(generate, methods)
    rerankers = catalog.by_kind(BI_ENCODER) + catalog.by_kind(CROSS_ENCODER) + catalog.by_kind(LLM_RERANKER) + catalog.by_kind(MAXSIM)
    if rerankers:
        llm = LlmRerankers(catalog.by_kind(LLM_RERANKER), backend, executor) if catalog.by_kind(LLM_RERANKER) else None
        rerank = RerankService(catalog, tokenizers, encoder, executor, settings.max_documents_per_call, llm=llm)
        rerank_pb2_grpc.add_RerankServicer_to_server(rerank, methods)

    # Health per service: what each needs from Triton. Services not built yet are not listed
    # (a health check for them answers SERVICE_UNKNOWN; their RPCs answer UNIMPLEMENTED).
    embed_models = [m.triton_model for m in catalog.by_kind(EMBEDDING)]
    all_models = sorted({m.triton_model for m in catalog.models})
    # Tokenize needs only the gateway's tokenizers.
    needs = {"": all_models, SERVICE_NAMES["embed"]: embed_models, SERVICE_NAMES["models"]: [], SERVICE_NAMES["tokenize"]: []}
    if generators:
        needs[SERVICE_NAMES["generate"]] = sorted({m.triton_model for m in generators})
    if rerankers:
        needs[SERVICE_NAMES["rerank"]] = sorted({m.triton_model for m in rerankers})
    health = HealthMonitor(backend, needs, settings.health_poll_interval)
    methods.add_reflection(  # behind --reflection
        [*SERVICE_NAMES.values(), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    )
    methods.install(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)  # never guarded
    port = tls.bind(server, f"{settings.host}:{settings.port}", settings)
    if port == 0:
        raise RuntimeError(f"could not bind {settings.host}:{settings.port}")
    health_server = None
    if settings.health_port:  # health says nothing secret: plaintext, no keys, no reflection
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if settings.workers > 1 else 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, health_server)
        if health_server.add_insecure_port(f"{settings.host}:{settings.health_port}") == 0:
            raise RuntimeError(f"could not bind the health port {settings.host}:{settings.health_port}")
        await health_server.start()
    await server.start()
    await health.start()
    http = None
    if settings.http_port:  # the same services, guard and keys over HTTP
        front = HttpFront(
            guard, catalog, embed=embed, rerank=rerank, generate=generate, health=health,
            max_body_bytes=settings.max_http_body_bytes, receive_timeout=settings.http_receive_timeout,
        )
        http = HttpServer(
            front.app,
            tls=tls.https_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
            max_connections=settings.http_max_connections,
            keep_alive=settings.http_keep_alive,
            receive_timeout=settings.http_receive_timeout,
            on_drain=lambda: setattr(front, "draining", True),
        )
        try:
            await http.start(settings.host, settings.http_port, settings.drain_seconds, reuse_port=settings.workers > 1)
        except BaseException:
            await server.stop(None)
            if health_server is not None:
                await health_server.stop(None)
            raise
    poll = metrics.triton_batches.poll(backend, all_models, settings.triton_stats_interval)
    return Gateway(server, port, health, backend, executor, metrics, [asyncio.create_task(poll)], http, health_server)
