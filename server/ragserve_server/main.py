"""`python -m ragserve_server`: launches the bundled Triton (or uses --triton-url) and serves."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import structlog

from ragserve_server.app import create_gateway
from ragserve_server.catalog import build_catalog, parse_cross_encoders
from ragserve_server.logging_setup import configure_logging
from ragserve_server.settings import REPO_ROOT, Settings
from ragserve_server.triton import TritonBackend
from ragserve_server.triton_launcher import TritonPorts, TritonServer, available_models

log = structlog.get_logger("ragserve")


async def serve(settings: Settings) -> None:
    triton = None
    cross_encoders = parse_cross_encoders(settings.cross_encoders)
    if settings.triton_url:
        triton_url = settings.triton_url
        triton_models = {m.strip() for m in settings.triton_models.split(",") if m.strip()}
    else:
        wanted = [m.strip() for m in settings.triton_models.split(",") if m.strip()]
        wanted += bundled_cross_encoders(settings.model_repository, cross_encoders)
        loaded = available_models(settings.model_repository, wanted)
        triton = TritonServer(
            settings.model_repository,
            loaded,
            TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port),
            REPO_ROOT / "build",
        )
        triton.start()
        try:
            await asyncio.to_thread(triton.wait_ready, settings.triton_ready_timeout)
        except BaseException:
            triton.stop()
            raise
        triton_url, triton_models = triton.grpc_url, set(loaded)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    gateway = None
    try:
        catalog = build_catalog(
            max_inputs_per_call=settings.max_inputs_per_call,
            triton_models=triton_models,
            max_documents_per_call=settings.max_documents_per_call,
            cross_encoders=cross_encoders,
            default_reranker=settings.default_reranker,
            model_repository=settings.model_repository,
        )
        gateway = await create_gateway(settings, TritonBackend(triton_url), catalog)
        if settings.metrics_port:
            gateway.metrics.serve(settings.host, settings.metrics_port)
        log.info(
            "serving",
            grpc=f"{settings.host}:{gateway.port}",
            triton=triton_url,
            metrics=f"http://{settings.host}:{settings.metrics_port}/metrics" if settings.metrics_port else None,
            triton_metrics=triton.metrics_url if triton else None,
            models=[m.name for m in catalog.models],
        )
        where = [f"Triton gRPC {triton_url}"]
        if settings.metrics_port:
            where.append(f"metrics http://{settings.host}:{settings.metrics_port}/metrics")
        if triton is not None:
            where.append(f"Triton metrics {triton.metrics_url}")
        print(f"ragserve listening on {settings.host}:{gateway.port} ({'; '.join(where)}); Ctrl-C to stop", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("draining", grace_seconds=settings.drain_seconds)
    finally:
        if gateway is not None:
            await gateway.stop(settings.drain_seconds)
        if triton is not None:
            await asyncio.to_thread(triton.stop)
        log.info("stopped")


def bundled_cross_encoders(model_repository: Path, cross_encoders: dict[str, Path]) -> list[str]:
    """The Triton models of the configured cross-encoders: the bundled Triton loads them too,
    so they must live in its model repository."""
    names = []
    repository = Path(model_repository).resolve()
    for name, folder in cross_encoders.items():
        folder = Path(folder).resolve()
        if folder.parent != repository:
            raise SystemExit(
                f"cross-encoder {name!r}: {folder} is not in the bundled Triton's model repository {repository}; "
                f"export it there (scripts/export_cross_encoder.py --out {repository}/<name>) or pass --model-repository"
            )
        names.append(folder.name)
    return names


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
