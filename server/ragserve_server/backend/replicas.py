"""Several Triton replicas behind one gateway: readiness per model, spreading, one retry.

`ReplicaSet` is the `InferenceBackend` the services use. It holds one gRPC channel per
replica (a `TritonBackend`, gRPC's `pick_first` on that address, reconnect backoff capped at
a second) and spreads calls round-robin over the replicas that are up *and* have the model
ready. Why not one channel with gRPC's `round_robin` policy alone: Triton's gRPC health
service answers `Check` but not `Watch` (UNIMPLEMENTED, seen with the bundled 2.51), so
gRPC's client-side health checking cannot see a replica that is up but has not loaded a
model, and one balanced channel cannot say which replica failed (per-replica metrics) nor
steer a retry away from the replica that just failed. What gRPC does do here is kept:
connection management, reconnect backoff and fast failure on a dead connection per address.

Targets (`backend/targets.py`): `host:port[,host:port...]`, `dns:///name:port` (the system
resolver; a Kubernetes headless Service) or `dns://DNS_SERVER_IP[:port]/name:port` (that DNS
server asked directly), re-resolved on every refresh so pods that come and go are followed;
a failed lookup keeps the replicas we had.

Failover: a call that fails UNAVAILABLE marks its replica down at once (the refresh, every
`interval` seconds, brings it back when it answers ready again). Idempotent unary calls
(Embed, Rerank: `infer`) are retried once on another ready replica within the caller's
deadline; a stream is retried only if it failed before its first response, so a Generate
stream that has sent text ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from ragserve_server.errors import BackendUnavailable, DeadlineExceeded, RagserveError
from ragserve_server.backend.protocol import DEFAULT_PRIORITY
from ragserve_server.backend.targets import DnsLookupFailed, parse_targets, resolve
from ragserve_server.backend.triton import TritonBackend

log = structlog.get_logger(__name__)

# Seconds the calls in flight on a replica that left the DNS answer get before its channel
# closes (a Generate stream can run this long; a unary call is over long before).
RETIRE_GRACE = 60.0

# Validates a replica's config of a model before it takes calls: problems, or [] when fine.
ConfigValidator = Callable[[str, object], list[str]]


@dataclass
class ReplicaStats:
    """Counters of one replica, read by the metrics module."""

    address: str
    up: bool = False
    ready_models: frozenset[str] = frozenset()
    calls: int = 0
    failures: int = 0  # calls that failed on this replica, retried or not


@dataclass
class Replica:
    address: str
    backend: TritonBackend
    stats: ReplicaStats
    validated: dict[str, list[str]] = field(default_factory=dict)  # model -> config problems

    def ready_for(self, model: str) -> bool:
        return self.stats.up and model in self.stats.ready_models


class ReplicaSet:
    """InferenceBackend over one or more Triton replicas."""

    def __init__(
        self,
        target: str,
        models: Sequence[str],
        *,
        interval: float = 1.0,
        validate: ConfigValidator | None = None,
        backend_factory: Callable[[str], TritonBackend] = TritonBackend,
    ) -> None:
        self.static, self.dns = parse_targets(target)
        self.target = target
        self.models = list(models)
        self.interval = interval
        self.validate = validate
        self._factory = backend_factory
        self.replicas: dict[str, Replica] = {}
        self._next = 0
        self._task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()  # channels of removed replicas, closing
        self.retries = 0
        for address in self.static:
            self._add(address)

    # -- membership and readiness ---------------------------------------------------------

    def _add(self, address: str) -> Replica:
        replica = Replica(address, self._factory(address), ReplicaStats(address))
        self.replicas[address] = replica
        log.info("triton_replica_added", replica=address)
        return replica

    async def _resolve(self) -> list[str]:
        try:
            return await resolve(self.dns)
        except DnsLookupFailed as exc:
            log.warning("triton_dns_failed", target=str(self.dns), error=str(exc))
            return list(self.replicas)  # keep what we had

    async def refresh(self) -> None:
        """Re-resolves (DNS targets) and asks every replica whether it and each model are ready."""
        if self.dns is not None:
            found = await self._resolve()
            for address in found:
                if address not in self.replicas:
                    self._add(address)
            for address in [a for a in self.replicas if a not in found]:
                self._retire(self.replicas.pop(address))
        await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values())))

    def _retire(self, replica: Replica) -> None:
        """Out of the set at once (no new call picks it); its channel closes once the calls in
        flight on it have ended (at most RETIRE_GRACE s), so a replica leaving DNS fails none."""
        log.info("triton_replica_removed", replica=replica.address)
        task = asyncio.create_task(replica.backend.close(grace=RETIRE_GRACE))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _probe(self, replica: Replica) -> None:
        was = (replica.stats.up, replica.stats.ready_models)
        up = await replica.backend.is_ready([])
        ready = set()
        if up:
            for model in self.models:
                if await replica.backend.is_ready([model]) and await self._config_ok(replica, model):
                    ready.add(model)
        else:
            replica.validated.clear()  # a restarted replica may come back with other configs
        replica.stats.up, replica.stats.ready_models = up, frozenset(ready)
        if (up, replica.stats.ready_models) != was:
            log.info("triton_replica_changed", replica=replica.address, up=up, ready_models=sorted(ready))

    async def _config_ok(self, replica: Replica, model: str) -> bool:
        if self.validate is None:
            return True
        if model not in replica.validated:
            try:
                config = await replica.backend.model_config(model)
            except RagserveError:
                return False
            replica.validated[model] = self.validate(model, config)
            for problem in replica.validated[model]:
                log.error("triton_replica_config_mismatch", replica=replica.address, problem=problem)
        return not replica.validated[model]

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep watching whatever one refresh did
                log.warning("triton_refresh_failed", error=str(exc))

    def stats(self) -> list[ReplicaStats]:
        return [r.stats for r in self.replicas.values()]

    def describe(self) -> str:
        """Each replica's state, for messages: `a:8001 up (minilm), b:8001 down`."""
        parts = []
        for r in self.replicas.values():
            state = f"up ({', '.join(sorted(r.stats.ready_models)) or 'no model ready'})" if r.stats.up else "down"
            parts.append(f"{r.address} {state}")
        return ", ".join(parts) or f"none resolved from {self.target}"

    # -- choosing and calling -------------------------------------------------------------

    def _pick(self, model: str, exclude: set[str]) -> Replica:
        candidates = [r for r in self.replicas.values() if r.ready_for(model) and r.address not in exclude]
        if not candidates:
            raise BackendUnavailable(f"model server unavailable: no Triton replica can serve model {model!r} now: {self.describe()}")
        self._next = (self._next + 1) % len(candidates)
        return candidates[self._next]

    def _may_retry(self, model: str, tried: set[str]) -> bool:
        """Once per call, and only onto another replica that can serve the model."""
        return len(tried) == 1 and any(r.ready_for(model) and r.address not in tried for r in self.replicas.values())

    def _failed(self, replica: Replica, exc: RagserveError) -> None:
        replica.stats.failures += 1
        if isinstance(exc, BackendUnavailable):
            # Out at once; the next refresh brings it back when it answers ready again.
            replica.stats.up = False
            log.warning("triton_replica_failed", replica=replica.address, error=exc.message)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        """Idempotent: an UNAVAILABLE replica is replaced by another once, within `timeout`."""
        start = time.monotonic()
        tried: set[str] = set()
        while True:
            replica = self._pick(model, tried)
            tried.add(replica.address)
            replica.stats.calls += 1
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise DeadlineExceeded("deadline exceeded before the model was called")
            try:
                return await replica.backend.infer(model, inputs, outputs, timeout=left, priority=priority)
            except BackendUnavailable as exc:
                self._failed(replica, exc)
                if not self._may_retry(model, tried):
                    raise
                self.retries += 1
                log.info("triton_retry", model=model, failed=replica.address)
            except RagserveError:
                replica.stats.failures += 1
                raise

    async def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        """Retried once on another replica only if nothing was received yet."""
        start = time.monotonic()
        tried: set[str] = set()
        while True:
            replica = self._pick(model, tried)
            tried.add(replica.address)
            replica.stats.calls += 1
            left = None if timeout is None else timeout - (time.monotonic() - start)
            received = False
            responses = replica.backend.stream(model, inputs, outputs, timeout=left, priority=priority)
            try:
                async for item in responses:
                    received = True
                    yield item
                return
            except BackendUnavailable as exc:
                self._failed(replica, exc)
                if received or not self._may_retry(model, tried):
                    raise
                self.retries += 1
                log.info("triton_retry", model=model, failed=replica.address, stream=True)
            except RagserveError:
                replica.stats.failures += 1
                raise
            finally:
                await responses.aclose()

    async def is_ready(self, models: Sequence[str]) -> bool:
        """From the last refresh: some replica is up and (each of `models`) ready on one."""
        if not models:
            return any(r.stats.up for r in self.replicas.values())
        return all(any(r.ready_for(m) for r in self.replicas.values()) for m in models)

    async def batch_statistics(self, model: str) -> dict[int, int]:
        """Executions per batch size, summed over the replicas that answer."""
        total: dict[int, int] = {}
        for replica in [r for r in self.replicas.values() if r.stats.up]:
            try:
                sizes = await replica.backend.batch_statistics(model)
            except RagserveError:
                continue
            for size, count in sizes.items():
                total[size] = total.get(size, 0) + count
        return total

    async def model_configs(self, model: str) -> dict[str, object]:
        """The config of `model` on every replica that is up, by address."""
        configs = {}
        for replica in [r for r in self.replicas.values() if r.stats.up]:
            try:
                configs[replica.address] = await replica.backend.model_config(model)
            except RagserveError:
                continue
        return configs

    async def model_config(self, model: str):
        configs = await self.model_configs(model)
        if not configs:
            raise BackendUnavailable(f"no Triton replica answers for model {model!r}: {self.describe()}")
        return next(iter(configs.values()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for replica in self.replicas.values():
            await replica.backend.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)
