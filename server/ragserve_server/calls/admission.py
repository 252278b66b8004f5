"""Bounded admission in two lanes: a permit is taken before any work.

Lanes: `interactive` (the default: a query behind a user's request) and `bulk` (EmbedStream
messages, or a call that asks for PRIORITY_BULK). Each has its own budget, so a bulk job
that fills its lane leaves the interactive lane untouched; Triton's priority levels then
order the two inside the model's queue.

A unary call that finds its lane full is answered RESOURCE_EXHAUSTED at once, with a retry
hint computed from the load: the mean time a permit of that lane has recently been held
(an exponentially weighted average of call durations), scaled by how full the lane is. A
stream message waits for a bulk permit instead (the stream stops reading; HTTP/2 flow
control pushes back on the sender), bounded by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ragserve_server.errors import DeadlineExceeded, Overloaded

INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)
# Triton priority level per lane (1 = highest; the models' configs declare 2 levels).
TRITON_PRIORITY = {INTERACTIVE: 1, BULK: 2}

MIN_HINT_S, MAX_HINT_S = 0.01, 30.0

# The lane of the call (or stream message) being served, set by the call scope; services
# hand its Triton priority to the backend with every request (current_priority()).
CURRENT_LANE: ContextVar[str] = ContextVar("ragserve_lane", default=INTERACTIVE)


def current_priority() -> int:
    """The Triton priority of the lane being served."""
    return TRITON_PRIORITY[CURRENT_LANE.get()]


@dataclass
class Lane:
    capacity: int
    in_use: int = 0
    mean_hold: float = 0.0  # seconds a permit is held: EWMA of recent calls (0 = none yet)
    waiters: deque | None = None
    refused: deque | None = None  # times of recent refusals: callers that will come back

    def hint(self) -> float:
        """Seconds until retrying is likely to find a permit.

        One mean call time frees the lane's permits once; the callers refused in that time
        come back competing for them, so the k-th refused caller is told to wait about k
        capacities' worth of call times. Refusals thus spread their retries out instead of
        all coming back at once (gRPC's retry honours the hint exactly). A little jitter
        breaks ties.
        """
        now = time.monotonic()
        hold = self.mean_hold or 0.05
        window = max(hold, 1.0)
        while self.refused and now - self.refused[0] > window:
            self.refused.popleft()
        self.refused.append(now)
        waiting = len(self.waiters or ()) + len(self.refused)
        seconds = hold * (1 + waiting / max(self.capacity, 1)) * random.uniform(0.9, 1.1)
        return min(MAX_HINT_S, max(MIN_HINT_S, seconds))


class Admission:
    def __init__(self, max_concurrent: int, max_bulk: int | None = None, *, shared: bool = False) -> None:
        interactive = Lane(max_concurrent, waiters=deque(), refused=deque())
        bulk = interactive if shared else Lane(
            max_bulk if max_bulk is not None else max(1, max_concurrent // 2), waiters=deque(), refused=deque()
        )
        self.lanes = {INTERACTIVE: interactive, BULK: bulk}
        self.shared = shared  # one lane for all (a comparison setting): bulk work is not told apart

    @property
    def capacity(self) -> int:
        return self.lanes[INTERACTIVE].capacity

    @property
    def in_use(self) -> int:
        return sum(lane.in_use for lane in self.lanes.values())

    def lane_for(self, lane: str) -> str:
        return INTERACTIVE if self.shared else lane

    def acquire(self, lane: str = INTERACTIVE) -> float:
        """Takes a permit or raises Overloaded with a retry hint; returns the start time to
        pass to `release`. The event loop is single-threaded: plain counters are race-free."""
        state = self.lanes[lane]
        if state.in_use >= state.capacity or state.waiters:
            raise Overloaded(
                f"server is at capacity ({state.capacity} {lane} requests in flight); retry after the hinted delay",
                retry_after=state.hint(),
            )
        state.in_use += 1
        return time.monotonic()

    async def acquire_waiting(self, lane: str, timeout: float | None) -> float:
        """Waits (FIFO) for a permit of `lane`, at most `timeout` seconds."""
        state = self.lanes[lane]
        if state.in_use < state.capacity and not state.waiters:
            state.in_use += 1
            return time.monotonic()
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        state.waiters.append(ready)
        # asyncio.wait, not asyncio.wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives as the permit is granted, and the cancelled call would go on to run.
        try:
            granted, _ = await asyncio.wait({ready}, timeout=timeout)
        except BaseException:
            self._leave_queue(state, ready)
            raise
        if not granted:
            self._leave_queue(state, ready)
            raise DeadlineExceeded(f"deadline exceeded while waiting for a {lane} permit")
        return time.monotonic()

    def _leave_queue(self, state: Lane, ready: asyncio.Future) -> None:
        if ready.done() and not ready.cancelled():
            self._release_count(state)  # granted while we were leaving: pass it on
        else:
            ready.cancel()
            if ready in state.waiters:
                state.waiters.remove(ready)

    def release(self, lane: str = INTERACTIVE, started: float | None = None) -> None:
        state = self.lanes[lane]
        if started is not None:
            held = time.monotonic() - started
            state.mean_hold = held if not state.mean_hold else state.mean_hold + 0.2 * (held - state.mean_hold)
        self._release_count(state)

    @staticmethod
    def _release_count(state: Lane) -> None:
        while state.waiters:  # hand the permit straight to the next waiter
            waiter = state.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        state.in_use -= 1

    @asynccontextmanager
    async def permit(self, lane: str, timeout: float | None):
        started = await self.acquire_waiting(lane, timeout)
        try:
            yield
        finally:
            self.release(lane, started)

    def hint(self, lane: str = INTERACTIVE) -> float:
        return self.lanes[lane].hint()
