"""Joins concurrent encoder requests of one shape into one Triton request, in the gateway.

Why, when Triton has a dynamic batcher: each Triton request costs the gateway a client RPC,
Triton a request (queueing, its scheduler, its gRPC front) and the python backend a round
trip through shared memory, and every one of those is paid before Triton's batcher sees the
request. For a single-sentence call that overhead is as large as the sentence's share of a
batched model run (bench/profile_embed.py), and on a CPU machine it is taken from the model.

How: at most `max_in_flight` requests per (model, width, priority) are with Triton at a time.
While they are, callers of the same shape wait here and leave together, up to the model's
max rows, as soon as one in-flight request returns. So an idle gateway sends a call at once
(no added delay), and a busy one sends what gathered during one model run as one request,
which is the batch Triton's batcher would have formed anyway. Triton still batches across
gateways and replicas. A caller whose deadline passes or who is cancelled while waiting is
dropped before anything is sent for it.

Bulk work (a priority below the top one: EmbedStream messages, PRIORITY_BULK calls) has its
own gate per model: at most `bulk_in_flight` of its Triton requests at a time, each of at most
`bulk_rows` rows (a bigger one is cut). Triton's priority levels order its queue but cannot
take a model instance back from a running execution, and its batcher joins queued bulk
requests up to the model's max rows: without the gate an interactive query arriving during
a bulk job waits for a whole 64-row execution on every instance (on a CPU, about a second).
With it, bulk work holds fewer instances than the model has, in short executions, so an
interactive query finds an instance free (bench/priority_bench.py measures both).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ragserve_server.observability import tracing
from ragserve_server.errors import DeadlineExceeded
from ragserve_server.backend.protocol import DEFAULT_PRIORITY, InferenceBackend
from ragserve_server.calls.admission import INTERACTIVE, TRITON_PRIORITY

INTERACTIVE_PRIORITY = TRITON_PRIORITY[INTERACTIVE]
# The bulk gate's defaults on a CPU (make bench-priority, minilm's two CPU instances, 2 cores):
# 4-row bulk executions, one at a time: interactive p99 under a bulk job 2.4x idle, bulk
# throughput -20 %; 8 rows: 3.4x, -9 %; no gate: 34x. On a GPU a 64-row execution takes
# milliseconds: no gate by default.
CPU_BULK_ROWS, CPU_BULK_IN_FLIGHT = 4, 1


def bulk_gate(rows: int, in_flight: int, device: str) -> tuple[int, int]:
    """(bulk_rows, bulk_in_flight) from the settings, where -1 = the device's default."""
    on_cpu = device == "cpu"
    return (
        rows if rows >= 0 else (CPU_BULK_ROWS if on_cpu else 0),
        in_flight if in_flight >= 0 else (CPU_BULK_IN_FLIGHT if on_cpu else 0),
    )


# Requests of at most this many rows are joined here; larger ones always go straight to Triton.
SMALL_ROWS = 8


@dataclass
class _Waiter:
    inputs: Mapping[str, np.ndarray]
    rows: int
    deadline: float | None  # time.monotonic(); None = no deadline
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    batch: list["_Waiter"] | None = None  # the callers it was sent with, once sent
    request: asyncio.Task | None = None  # the task of that request
    span_context: object = None  # its caller's span, linked from the joined request's (tracing on)


@dataclass
class _Shape:
    max_rows: int
    in_flight: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)


class Coalescer:
    """`infer` like InferenceBackend's, for row-batched encoder models (outputs: one row per input row)."""

    def __init__(self, backend: InferenceBackend, max_in_flight: int, *, bulk_rows: int = 0, bulk_in_flight: int = 0) -> None:
        """`bulk_rows`, `bulk_in_flight`: the bulk gate (module docstring); 0 = no limit."""
        self.backend = backend
        self.max_in_flight = max_in_flight
        self.bulk_rows = bulk_rows
        self.bulk_in_flight = bulk_in_flight
        self._bulk_gates: dict[str, asyncio.Semaphore] = {}
        # One entry per (model, outputs, input shapes, priority): a few dozen at most, kept.
        self._shapes: dict[tuple, _Shape] = {}
        # Per model: [encoder requests in, Triton requests out] (their ratio is the coalescing).
        self.counts: dict[str, list[int]] = {}

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        max_rows: int,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        """The model's `outputs` for `inputs` (rows along axis 0), at most `max_rows` rows per request.
        Only requests of the same priority are joined."""
        self.counts.setdefault(model, [0, 0])[0] += 1
        rows = next(iter(inputs.values())).shape[0]
        if priority > INTERACTIVE_PRIORITY and (self.bulk_rows or self.bulk_in_flight):
            return await self._bulk(model, inputs, outputs, rows, timeout, priority)
        key = (model, tuple(outputs), tuple((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()), priority)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(max_rows)
        if (shape.in_flight < self.max_in_flight and not shape.waiting) or rows > SMALL_ROWS:
            # A free slot, or a request big enough that its overhead is small beside its
            # compute: straight to Triton, whose batcher still joins it with others. Holding
            # big requests here would leave the model idle between their batches.
            shape.in_flight += 1
            try:
                return await self._request(key, [inputs], timeout)
            finally:
                self._done(key, shape)
        waiter = _Waiter(inputs, rows, None if timeout is None else time.monotonic() + timeout, span_context=tracing.current_span_context())
        shape.waiting.append(waiter)
        try:
            return await waiter.result
        except asyncio.CancelledError:
            # Cancelling the caller cancelled `result` too: still waiting, it is skipped by
            # _release; sent, the request is cancelled (in Triton too) once all its callers left.
            if waiter.request is not None and all(w.result.cancelled() for w in waiter.batch):
                waiter.request.cancel()
            raise

    async def _bulk(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], rows: int, timeout: float | None, priority: int
    ) -> dict[str, np.ndarray]:
        """Bulk work through the model's gate: cut to `bulk_rows`, `bulk_in_flight` at a time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        step = self.bulk_rows or rows
        gate = self._bulk_gates.get(model)
        if gate is None and self.bulk_in_flight:
            gate = self._bulk_gates[model] = asyncio.Semaphore(self.bulk_in_flight)

        async def part(start: int) -> dict[str, np.ndarray]:
            loop_time = asyncio.get_running_loop().time()
            chunk = {name: value[start : start + step] for name, value in inputs.items()}
            if gate is None:
                return await self._send_bulk(model, chunk, outputs, deadline, priority)
            try:
                async with asyncio.timeout_at(None if deadline is None else loop_time + (deadline - time.monotonic())):
                    await gate.acquire()
            except TimeoutError:
                raise DeadlineExceeded("deadline exceeded while waiting to be sent to the model (bulk)") from None
            try:
                return await self._send_bulk(model, chunk, outputs, deadline, priority)
            finally:
                gate.release()

        starts = range(0, rows, step)
        if len(starts) == 1:
            return await part(0)
        tasks = [asyncio.ensure_future(part(start)) for start in starts]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:  # one part failed or the caller left: the other parts stop too
            for task in tasks:
                task.cancel()
            raise
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    async def _send_bulk(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], deadline: float | None, priority: int
    ) -> dict[str, np.ndarray]:
        self.counts[model][1] += 1
        timeout = None if deadline is None else deadline - time.monotonic()
        return await self.backend.infer(model, inputs, outputs, timeout=timeout, priority=priority)

    async def _request(self, key: tuple, parts: list[Mapping[str, np.ndarray]], timeout: float | None) -> dict[str, np.ndarray]:
        self.counts[key[0]][1] += 1
        inputs = parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return await self.backend.infer(key[0], inputs, key[1], timeout=timeout, priority=key[3])

    def _done(self, key: tuple, shape: _Shape) -> None:
        shape.in_flight -= 1
        self._release(key, shape)

    def _release(self, key: tuple, shape: _Shape) -> None:
        """Sends what waits for `key` as one request, now that a request slot is free."""
        if shape.in_flight >= self.max_in_flight:
            return
        now = time.monotonic()
        batch: list[_Waiter] = []
        rows = 0
        while shape.waiting:
            waiter = shape.waiting[0]
            if waiter.result.done():  # its caller was cancelled while it waited
                shape.waiting.popleft()
                continue
            if waiter.deadline is not None and waiter.deadline <= now:
                shape.waiting.popleft()
                waiter.result.set_exception(DeadlineExceeded("deadline exceeded while waiting to be sent to the model"))
                continue
            if batch and rows + waiter.rows > shape.max_rows:
                break
            shape.waiting.popleft()
            batch.append(waiter)
            rows += waiter.rows
        if batch:
            shape.in_flight += 1
            # A fresh context: the batch belongs to no one caller's trace or request record.
            task = asyncio.get_running_loop().create_task(self._send_batch(key, shape, batch), context=contextvars.Context())
            task.add_done_callback(_retrieve)
            for waiter in batch:
                waiter.batch, waiter.request = batch, task

    async def _send_batch(self, key: tuple, shape: _Shape, batch: list[_Waiter]) -> None:
        deadlines = [w.deadline for w in batch]
        # The latest deadline of the batch: an earlier caller's own deadline ends its wait.
        timeout = None if None in deadlines else max(deadlines) - time.monotonic()
        try:
            with tracing.joined_request_span([w.span_context for w in batch]):
                result = await self._request(key, [w.inputs for w in batch], timeout)
        except Exception as exc:  # each caller gets the request's typed error, mapped by the caller
            for waiter in batch:
                if not waiter.result.done():
                    waiter.result.set_exception(exc)
        except BaseException:  # the gateway is stopping: no caller is left waiting
            for waiter in batch:
                waiter.result.cancel()
            raise
        else:
            start = 0
            for waiter in batch:
                if not waiter.result.done():
                    waiter.result.set_result({name: value[start : start + waiter.rows] for name, value in result.items()})
                start += waiter.rows
        finally:
            self._done(key, shape)


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # errors went to the callers; this only marks the task's own as seen
