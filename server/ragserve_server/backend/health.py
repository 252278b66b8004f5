"""gRPC health per service name, following Triton's readiness.

A background task polls Triton; while it (or a model a service needs) is not ready, that
service reports NOT_SERVING, and calls to it answer UNAVAILABLE from the Triton boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import structlog
from grpc_health.v1 import health, health_pb2

from ragserve_server.backend.protocol import InferenceBackend

log = structlog.get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    def __init__(self, backend: InferenceBackend, needs: Mapping[str, Sequence[str]], interval: float) -> None:
        """`needs`: service name -> Triton models it needs ("" is the whole server)."""
        self.servicer = health.aio.HealthServicer()
        self.backend = backend
        self.needs = dict(needs)
        self.interval = interval
        self.serving: dict[str, bool] = {}
        self._task: asyncio.Task | None = None

    async def check_once(self) -> None:
        # Each model is asked about once per poll, however many services need it.
        models = sorted({m for needed in self.needs.values() for m in needed})
        server_ready = await self.backend.is_ready([])
        model_ready = {m: server_ready and await self.backend.is_ready([m]) for m in models}
        for service, needed in self.needs.items():
            # A service that needs no model (Models: ListModels answers from the catalog) serves
            # while the process does: the liveness probe's service in deploy/kubernetes.
            ready = all(model_ready[m] for m in needed) if needed else True
            if self.serving.get(service) != ready:
                log.info("health_changed", health_service=service or "<server>", serving=ready)
            self.serving[service] = ready
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception as exc:  # noqa: BLE001 - keep polling whatever one check did
                log.warning("health_check_failed", error=str(exc))
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        await self.check_once()
        self._task = asyncio.create_task(self._run())

    async def shutdown(self) -> None:
        """Reports NOT_SERVING everywhere (draining) and stops polling."""
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()
