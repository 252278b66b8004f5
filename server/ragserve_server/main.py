"""`python -m ragserve_server`: launches the bundled Triton (or uses --triton-url) and serves."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import secrets
import signal
import sys
from pathlib import Path

import structlog

from ragserve_server.security import tls

from ragserve_server.observability import tracing

from ragserve_server.supervision import workers
from ragserve_server.app import create_gateway
from ragserve_server.security.auth import Authenticator
from ragserve_server.models.catalog import build_catalog
from ragserve_server.observability.logging_setup import configure_logging
from ragserve_server.models.model_config import mismatches
from ragserve_server.models.registry import (
    CPU,
    CROSS_ENCODER,
    DEVICES,
    EMBEDDING,
    GENERATION,
    GPU,
    TORCH_CUDA,
    ModelSpec,
)
from ragserve_server.models.builtin import builtin_specs
from ragserve_server.models.manifest import exported_spec, parse_named_folders
from ragserve_server.models.repository import render_repository
from ragserve_server.paths import REPO_ROOT
from ragserve_server.settings import Settings
from ragserve_server.backend.replicas import ReplicaSet
from ragserve_server.backend.triton import TritonBackend
from ragserve_server.supervision.triton_launcher import RestartPolicy, TritonPorts, TritonServer, TritonSupervisor

log = structlog.get_logger("ragserve")


class StartupError(SystemExit):
    """Start-up refused with a message for a person (no traceback): exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ragserve: {message}")


def select_specs(settings: Settings) -> list[ModelSpec]:
    """The registry entries this gateway serves: built-ins by Triton name, then exported models."""
    try:
        names = [m.strip() for m in settings.triton_models.split(",") if m.strip()]
        specs = builtin_specs(settings.model_repository, names)
        for flag, value, kind in (
            ("--embedding-models", settings.embedding_models, EMBEDDING),
            ("--cross-encoders", settings.cross_encoders, CROSS_ENCODER),
        ):
            for name, folder in parse_named_folders(value, flag).items():
                specs.append(exported_spec(folder, name=name, kind=kind))
    except (ValueError, RuntimeError) as exc:
        raise StartupError(str(exc)) from None
    taken: dict[str, str] = {}
    for spec in specs:
        if spec.triton_model in taken:
            raise StartupError(f"models {taken[spec.triton_model]!r} and {spec.name!r} both use Triton model {spec.triton_model!r}")
        taken[spec.triton_model] = spec.name
    return specs


def check_device(device: str) -> None:
    """`--device gpu` needs a CUDA GPU where the bundled Triton runs (this machine)."""
    if device not in DEVICES:
        raise StartupError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == GPU:
        import torch  # only for the check: the models import it in Triton's processes

        if not torch.cuda.is_available():
            raise StartupError(
                "--device gpu: no CUDA GPU is visible on this machine (torch.cuda.is_available() is False); "
                "run on a machine with an NVIDIA GPU and driver, use --device cpu, or point --triton-url at a GPU Triton"
            )


def bundled_repository(settings: Settings, specs: list[ModelSpec]) -> Path:
    """The repository the bundled Triton runs: model_repository/ itself on the CPU (configs
    re-rendered from the registry), a rendered GPU repository under build/ on a GPU."""
    repository = Path(settings.model_repository).resolve()
    for spec in specs:
        if not (repository / spec.triton_model).is_dir():
            raise StartupError(
                f"model {spec.name!r}: its folder is not in the bundled Triton's model repository {repository}; "
                f"export it there (--out {repository}/{spec.triton_model}) or pass --model-repository"
            )
    missing = [line for spec in specs for line in spec.missing_artifacts(repository, spec.variant_for(settings.device, TORCH_CUDA))]
    if missing:
        raise StartupError(
            "models not built:\n  " + "\n  ".join(missing) + "\n(or leave the model out: --triton-models / --cross-encoders)"
        )
    if settings.device == CPU:
        render_repository(specs, CPU, repository, source=repository)
        return repository
    out = REPO_ROOT / "build" / "model_repository" / GPU
    render_repository(specs, GPU, out, source=repository, encoder_backend=TORCH_CUDA)
    return out


def config_validator(specs: list[ModelSpec]):
    """(triton model, its ModelConfig) -> what disagrees with what the gateway sends."""
    by_model = {s.triton_model: s for s in specs}

    def validate(model: str, config) -> list[str]:
        spec = by_model[model]
        return mismatches(model, spec.max_batch, spec.inputs, spec.outputs, config, exact_batch=spec.kind != GENERATION)

    return validate


async def check_triton_configs(backend: ReplicaSet, specs: list[ModelSpec]) -> None:
    """Refuses to serve when a model's config in a running Triton replica disagrees with what
    the gateway sends (max batch, input names, dtypes, dims): never an INTERNAL at request time.
    Replicas that join later with such a config are kept out of rotation (and logged)."""
    problems = []
    validate = config_validator(specs)
    for spec in specs:
        for address, config in (await backend.model_configs(spec.triton_model)).items():
            where = f" (replica {address})" if len(backend.replicas) > 1 else ""
            problems += [p + where for p in validate(spec.triton_model, config)]
    if problems:
        raise StartupError(
            "Triton serves models whose config disagrees with the registry (server/ragserve_server/models/registry.py):\n  "
            + "\n  ".join(problems)
            + "\nre-render the repository (`make configs`, or `python -m ragserve_server.models.repository`) and restart Triton"
        )


def check_exposure(settings: Settings) -> None:
    """Safe defaults: refuses settings that would serve more openly than they look."""
    if settings.trust_network not in ("yes", "no"):
        raise StartupError(f"--trust-network {settings.trust_network!r}: use yes or no")
    for name in ("max_http_body_bytes", "max_message_bytes", "http_max_connections", "grpc_max_concurrent_streams"):
        if getattr(settings, name) < 1:
            raise StartupError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.http_receive_timeout <= 0 or settings.http_keep_alive <= 0:
        raise StartupError("--http-receive-timeout and --http-keep-alive must be above 0 seconds")
    if settings.is_loopback() or settings.trust_network == "yes":
        return
    if not settings.api_keys_file and not settings.tls_cert:
        raise StartupError(
            f"--host {settings.host} is reachable from the network, and neither --api-keys-file nor --tls-cert (with "
            "--tls-client-ca) says who may call: anyone who reaches the port could use the models. Set keys and/or "
            "mTLS, or pass --trust-network yes when only trusted callers can reach this address"
        )
    if settings.api_keys_file and not settings.tls_cert:
        raise StartupError(
            f"--host {settings.host} with --api-keys-file but no --tls-cert: keys would cross the network in clear text. "
            "Set --tls-cert/--tls-key, or pass --trust-network yes (e.g. TLS ends at a proxy or mesh in front of the gateway)"
        )


def with_workers_counted(settings: Settings) -> Settings:
    """`--workers 0` (auto) made a count; each worker works it out alike from the same command line."""
    if settings.workers != 0:
        return settings
    return dataclasses.replace(settings, workers=workers.auto_count(settings.device, bundled_triton=not settings.triton_url))


async def serve(settings: Settings, argv: list[str] | None = None) -> None:
    """`settings`: with --workers counted (`main` applies `with_workers_counted`). `argv`: the
    command line, for the workers worker 0 starts (--workers)."""
    triton = None
    gave_up = None
    pool = pool_task = None
    if settings.workers < 1 or not 0 <= settings.worker_index < settings.workers:
        raise StartupError(f"--workers {settings.workers} must be 1 or more, or 0 for auto (--worker-index {settings.worker_index} is set by worker 0)")
    if settings.workers > 1:  # this worker's share (workers.py)
        settings = dataclasses.replace(
            settings,
            max_concurrent_requests=workers.share(settings.max_concurrent_requests, settings.workers),
            max_bulk_requests=workers.share(settings.max_bulk_requests, settings.workers),
            metrics_port=workers.metrics_port(settings.metrics_port, settings.worker_index),
        )
    check_exposure(settings)
    specs = select_specs(settings)
    try:  # TLS files and the keys file are checked before anything starts
        triton_credentials = tls.triton_channel_credentials(settings.triton_tls_ca, settings.triton_tls_cert, settings.triton_tls_key)
        tls.check_settings(settings)
        Authenticator.from_settings(settings.api_keys_file, settings.reflection)
        tracing.configure(settings.tracing)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if settings.on_no_replicas not in ("wait", "exit"):
        raise StartupError(f"--on-no-replicas {settings.on_no_replicas!r}: use wait or exit")
    if settings.triton_url:
        if settings.device not in DEVICES:  # the GPU is on Triton's host: only the name is checked here
            raise StartupError(f"--device {settings.device!r} is not one of {', '.join(DEVICES)}")
        triton_url = settings.triton_url
    else:
        check_device(settings.device)
        repository = bundled_repository(settings, specs)
        triton = TritonServer(
            repository,
            [s.triton_model for s in specs],
            TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port),
            REPO_ROOT / "build",
            trace_url=settings.triton_trace_url,
            trace_rate=settings.triton_trace_rate,
            admin_key=secrets.token_urlsafe(24),  # model loading and the like closed to everyone (the gateway needs none)
        )
        triton.start()
        try:
            await asyncio.to_thread(triton.wait_ready, settings.triton_ready_timeout)
        except BaseException:
            triton.stop()
            raise
        triton_url = triton.grpc_url

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    gateway = None
    try:
        backend = ReplicaSet(
            triton_url,
            [s.triton_model for s in specs],
            interval=settings.health_poll_interval,
            validate=config_validator(specs),
            backend_factory=functools.partial(TritonBackend, credentials=triton_credentials),
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        await backend.start()
        if not any(r.stats.up for r in backend.replicas.values()):
            if settings.on_no_replicas == "exit":
                raise StartupError(f"no Triton replica answers at {triton_url}: {backend.describe()} (--on-no-replicas exit)")
            log.warning("no_triton_replica_ready", target=triton_url, replicas=backend.describe(), waiting=True)
        await check_triton_configs(backend, specs)
        try:
            catalog = build_catalog(
                specs,
                max_inputs_per_call=settings.max_inputs_per_call,
                max_documents_per_call=settings.max_documents_per_call,
                default_reranker=settings.default_reranker,
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        gateway = await create_gateway(settings, backend, catalog)
        if settings.metrics_port:
            gateway.metrics.serve(settings.host, settings.metrics_port)
        log.info(
            "serving",
            grpc=f"{settings.host}:{gateway.port}",
            http=f"http://{settings.host}:{gateway.http_port}" if gateway.http_port else None,
            tracing=tracing.enabled(),
            triton=triton_url,
            device=settings.device,
            metrics=f"http://{settings.host}:{settings.metrics_port}/metrics" if settings.metrics_port else None,
            triton_metrics=triton.metrics_url if triton else None,
            models=[m.name for m in catalog.models],
        )
        where = [f"Triton gRPC {triton_url}"]
        if gateway.http_port:
            where.insert(0, f"HTTP http://{settings.host}:{gateway.http_port}/v1")
        if settings.metrics_port:
            where.append(f"metrics http://{settings.host}:{settings.metrics_port}/metrics")
        if triton is not None:
            where.append(f"Triton metrics {triton.metrics_url}")
        print(f"ragserve listening on {settings.host}:{gateway.port} ({'; '.join(where)}); Ctrl-C to stop", file=sys.stderr, flush=True)
        if settings.workers > 1 and settings.worker_index == 0:
            pool = workers.WorkerPool(
                {
                    i: workers.child_argv(argv or [], i, workers=settings.workers, port=gateway.port, http_port=gateway.http_port, triton_url=triton_url)
                    for i in range(1, settings.workers)
                },
                settings.drain_seconds,
            )
            pool_task = asyncio.create_task(pool.run())
        waiters = [asyncio.create_task(stop.wait())]
        if triton is not None:
            supervisor = TritonSupervisor(
                triton,
                RestartPolicy(settings.triton_restart_attempts, settings.triton_restart_backoff, stuck_seconds=settings.triton_stuck_seconds),
                settings.triton_ready_timeout,
                on_change=_health_follows(backend, gateway),
            )
            waiters.append(asyncio.create_task(supervisor.run()))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if waiters[0] not in done:
            gave_up = waiters[1].result()
            log.error("triton_gave_up", reason=gave_up)
        log.info("draining", grace_seconds=settings.drain_seconds)
    finally:
        # Workers and this gateway drain side by side; Triton stops after all of them.
        stopping = [gateway.stop(settings.drain_seconds) if gateway is not None else backend.close()]
        if pool is not None:
            pool_task.cancel()
            stopping.append(pool.stop())
        await asyncio.gather(*stopping)
        if triton is not None:
            await asyncio.to_thread(triton.stop)
        await asyncio.to_thread(tracing.shutdown)  # flushes the spans still batched
        log.info("stopped")
    if gave_up is not None:
        raise SystemExit(f"ragserve: exiting: {gave_up}")


def _health_follows(backend: ReplicaSet, gateway):
    """Re-reads Triton's state and health at once (the supervisor saw it go down or come back)."""

    async def now() -> None:
        await backend.refresh()
        await gateway.health.check_once()

    return now


def main(argv: list[str] | None = None) -> None:
    settings = with_workers_counted(Settings.from_args(argv))
    if settings.worker_index > 0:
        workers.die_with_parent()
    configure_logging(settings.log_format, settings.log_level, {"worker": settings.worker_index} if settings.workers > 1 else None)
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, sys.argv[1:] if argv is None else argv))


EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop_factory(name: str):
    """--event-loop: uvloop's loop (grpc.aio and uvicorn run on it as on asyncio's; it costs less
    CPU a call: `make profile`), or None for asyncio's own."""
    if name not in EVENT_LOOPS:
        raise StartupError(f"--event-loop {name!r}: use {' or '.join(EVENT_LOOPS)}")
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
