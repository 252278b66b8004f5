"""The gateway's coalescer (coalescer.py) over the fake backend: who is joined, who is not."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fakes import FakeBackend
from support import eventually
from ragserve_server.calls.admission import BULK, INTERACTIVE, TRITON_PRIORITY
from ragserve_server.encoding.coalescer import CPU_BULK_IN_FLIGHT, CPU_BULK_ROWS, SMALL_ROWS, Coalescer, bulk_gate
from ragserve_server.errors import BackendUnavailable, DeadlineExceeded


def tokens(*values: int, width: int = 16) -> dict[str, np.ndarray]:
    """One row per value: input_ids all `value` (the fake's embedding[:, 0] is the row's sum)."""
    ids = np.array([[v] * width for v in values], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


async def call(coalescer: Coalescer, *values: int, width: int = 16, lane: str = INTERACTIVE, timeout: float | None = 10.0):
    out = await coalescer.infer(
        "minilm", tokens(*values, width=width), ["embedding"], max_rows=4, timeout=timeout, priority=TRITON_PRIORITY[lane]
    )
    return [float(v) for v in out["embedding"][:, 0] / width]


async def test_an_idle_call_goes_straight_to_the_model():
    backend = FakeBackend()
    coalescer = Coalescer(backend, max_in_flight=2)
    assert await call(coalescer, 7) == [7.0]
    assert backend.calls == 1 and backend.timeouts == [10.0]


async def test_calls_that_arrive_while_the_slots_are_busy_leave_together_with_their_own_rows():
    backend = FakeBackend(delay=0.05)
    coalescer = Coalescer(backend, max_in_flight=2)
    results = await asyncio.gather(*(call(coalescer, v) for v in range(1, 7)))
    # Each caller gets its own rows back, in order.
    assert results == [[float(v)] for v in range(1, 7)]
    # Two went at once; the four that waited left as one request (max_rows 4).
    assert [r["input_ids"].shape[0] for r in backend.requests] == [1, 1, 4]
    assert coalescer.counts == {"minilm": [6, 3]}


async def test_a_batch_never_exceeds_max_rows_and_multi_row_calls_stay_whole():
    backend = FakeBackend(delay=0.02)
    coalescer = Coalescer(backend, max_in_flight=1)
    calls = [call(coalescer, 1), call(coalescer, 2, 3), call(coalescer, 4, 5), call(coalescer, 6), call(coalescer, 7, 8, 9)]
    results = await asyncio.gather(*calls)
    assert results == [[1.0], [2.0, 3.0], [4.0, 5.0], [6.0], [7.0, 8.0, 9.0]]
    sizes = [r["input_ids"].shape[0] for r in backend.requests]
    assert sizes == [1, 4, 4]  # 1; then (2, 3) + (4, 5); then 6 + (7, 8, 9)
    assert max(sizes) <= 4 and sum(sizes) == 9


async def test_a_big_call_goes_straight_to_the_model_even_when_the_slots_are_busy():
    backend = FakeBackend(delay=30.0)  # the small call holds the only slot until the big one is back
    coalescer = Coalescer(backend, max_in_flight=1)
    small = asyncio.create_task(call(coalescer, 1))
    await eventually(lambda: backend.calls == 1, what="the small call reaching the model")
    backend.delay = 0.0
    rows = list(range(10, 10 + SMALL_ROWS + 1))
    big = await coalescer.infer("minilm", tokens(*rows), ["embedding"], max_rows=64, timeout=10.0)
    assert [float(v) for v in big["embedding"][:, 0] / 16] == [float(v) for v in rows]
    assert not small.done()  # the big call did not wait for the slot
    small.cancel()
    await asyncio.gather(small, return_exceptions=True)
    # It was sent while the small call was still with the model, not after it.
    assert [r["input_ids"].shape[0] for r in backend.requests] == [1, SMALL_ROWS + 1]
    assert backend.calls == 2


async def test_shapes_and_lanes_are_never_mixed():
    backend = FakeBackend(delay=0.05)
    coalescer = Coalescer(backend, max_in_flight=1)
    calls = [call(coalescer, 1)]
    calls += [call(coalescer, v, width=32) for v in (2, 3)]
    calls += [call(coalescer, v, lane=BULK) for v in (4, 5, 6)]
    calls += [call(coalescer, v) for v in (7, 8)]
    results = await asyncio.gather(*calls)
    assert [r[0] for r in results] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    for request, lane in zip(backend.requests, backend.lanes):
        ids = request["input_ids"]
        assert len({ids.shape[1]}) == 1
        values = set(ids[:, 0].tolist())
        # Every request holds one lane's rows, and carries that lane's priority.
        assert values <= {4, 5, 6} if lane == BULK else not values & {4, 5, 6}


async def test_a_cancelled_or_expired_waiter_is_never_sent():
    backend = FakeBackend(delay=1.0)
    coalescer = Coalescer(backend, max_in_flight=1)
    first = asyncio.create_task(call(coalescer, 1))
    await eventually(lambda: backend.calls == 1, what="the first call reaching the model")
    cancelled = asyncio.create_task(call(coalescer, 2))
    expired = asyncio.create_task(call(coalescer, 3, timeout=0.1))
    kept = asyncio.create_task(call(coalescer, 4))
    await eventually(lambda: coalescer.counts["minilm"][0] == 4, what="the three calls reaching the coalescer")
    assert backend.calls == 1  # the first is still with the model: the three wait
    cancelled.cancel()
    assert await first == [1.0] and await kept == [4.0]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(DeadlineExceeded):
        await expired
    sent = [v for r in backend.requests for v in r["input_ids"][:, 0].tolist()]
    assert sent == [1, 4]


async def test_a_failed_request_fails_each_of_its_callers_and_the_next_calls_go_on():
    backend = FakeBackend(delay=0.05)
    coalescer = Coalescer(backend, max_in_flight=1)
    first = asyncio.create_task(call(coalescer, 1))
    await eventually(lambda: backend.calls == 1, what="the first call reaching the model")
    waiting = [asyncio.create_task(call(coalescer, v)) for v in (2, 3)]
    backend.fail = BackendUnavailable("model server unavailable: test")
    assert await first == [1.0]  # already with the model when the failure started
    for task in waiting:
        with pytest.raises(BackendUnavailable):
            await task
    backend.fail = None
    assert await call(coalescer, 5) == [5.0]


async def test_the_batch_gets_the_latest_deadline_of_its_callers():
    backend = FakeBackend(delay=0.05)
    coalescer = Coalescer(backend, max_in_flight=1)
    first = asyncio.create_task(call(coalescer, 1, timeout=5.0))
    await eventually(lambda: backend.calls == 1, what="the first call reaching the model")
    others = [asyncio.create_task(call(coalescer, 2, timeout=3.0)), asyncio.create_task(call(coalescer, 3, timeout=8.0))]
    await asyncio.gather(first, *others)
    assert backend.timeouts[0] == 5.0
    assert 6.0 < backend.timeouts[1] <= 8.0  # the 8 s caller's, less the time it waited (not 3 or 5)


async def test_a_sent_request_whose_callers_all_left_is_cancelled():
    backend = FakeBackend(delay=0.2)
    coalescer = Coalescer(backend, max_in_flight=1)
    first = asyncio.create_task(call(coalescer, 1))
    await eventually(lambda: backend.calls == 1, what="the first call reaching the model")
    waiting = [asyncio.create_task(call(coalescer, v)) for v in (2, 3)]
    await eventually(lambda: coalescer.counts["minilm"][0] == 3, what="the two calls reaching the coalescer")
    backend.delay = 60.0  # the joined request, once sent, would hold the slot for a minute
    assert await first == [1.0]
    await eventually(lambda: len(backend.requests) == 2, what="the two sent together")
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    # The shape's slot is free again (the request was cancelled, not left to run its minute).
    backend.delay = 0.0
    assert await asyncio.wait_for(call(coalescer, 4), 20) == [4.0]


class InFlight(FakeBackend):
    """Records the most requests it held at once."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.now = self.most = 0

    async def infer(self, *args, **kwargs):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await super().infer(*args, **kwargs)
        finally:
            self.now -= 1


async def test_bulk_work_is_cut_to_bulk_rows_and_sent_bulk_in_flight_at_a_time():
    backend = InFlight(delay=0.02)
    coalescer = Coalescer(backend, max_in_flight=2, bulk_rows=3, bulk_in_flight=1)
    values = list(range(1, 21))
    results = await asyncio.gather(call(coalescer, *values[:10], lane=BULK), call(coalescer, *values[10:], lane=BULK))
    assert results == [[float(v) for v in values[:10]], [float(v) for v in values[10:]]]  # each caller's rows, in order
    assert sorted(r["input_ids"].shape[0] for r in backend.requests) == [1, 1, 3, 3, 3, 3, 3, 3]
    assert backend.most == 1 and set(backend.lanes) == {BULK}


async def test_interactive_calls_pass_a_full_bulk_gate():
    backend = FakeBackend(delay=0.5)
    coalescer = Coalescer(backend, max_in_flight=2, bulk_rows=2, bulk_in_flight=1)
    bulk = asyncio.ensure_future(call(coalescer, *range(1, 9), lane=BULK))  # 4 requests, one at a time
    await eventually(lambda: backend.calls == 1, what="the first bulk request sent")
    assert await call(coalescer, 5) == [5.0]  # not behind the three bulk requests that wait for the gate
    assert backend.lanes[:2] == [BULK, INTERACTIVE]
    assert await bulk == [float(v) for v in range(1, 9)]


async def test_a_bulk_call_whose_deadline_passes_at_the_gate_fails_and_frees_nothing_it_did_not_take():
    backend = FakeBackend(delay=0.3)
    coalescer = Coalescer(backend, max_in_flight=2, bulk_rows=4, bulk_in_flight=1)
    first = asyncio.ensure_future(call(coalescer, 1, 2, 3, 4, lane=BULK))
    await eventually(lambda: backend.calls == 1, what="the first bulk request sent")
    with pytest.raises(DeadlineExceeded):
        await call(coalescer, 9, lane=BULK, timeout=0.05)
    assert await first == [1.0, 2.0, 3.0, 4.0]
    # The gate is whole again: the next bulk call goes at once.
    assert await call(coalescer, 7, lane=BULK) == [7.0] and backend.calls == 2


def test_the_bulk_gate_is_on_by_default_on_a_cpu_only():
    assert bulk_gate(-1, -1, "cpu") == (CPU_BULK_ROWS, CPU_BULK_IN_FLIGHT)
    assert bulk_gate(-1, -1, "gpu") == (0, 0)
    assert bulk_gate(16, 0, "cpu") == (16, 0)


async def test_a_failed_bulk_part_stops_the_other_parts_of_its_call():
    class FailsLate(FakeBackend):
        async def infer(self, *args, **kwargs):
            self.calls += 1
            await asyncio.sleep(0.05)
            raise BackendUnavailable("triton is down")

    backend = FailsLate()
    coalescer = Coalescer(backend, max_in_flight=2, bulk_rows=1, bulk_in_flight=1)
    with pytest.raises(BackendUnavailable):
        await call(coalescer, 1, 2, 3, lane=BULK)
    sent = backend.calls
    await asyncio.sleep(0.3)
    assert backend.calls == sent < 3  # nothing more is sent once the call failed
