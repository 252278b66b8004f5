"""Load shedding without Triton: lanes, retry hints, per-message permits for EmbedStream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from ragserve_server.calls.admission import BULK, INTERACTIVE, Admission
from ragserve_server.app import create_gateway
from ragserve_server.models.catalog import build_catalog
from ragserve_server.errors import DeadlineExceeded, Overloaded
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.settings import Settings
from fakes import FakeBackend
from support import eventually


def test_lanes_have_separate_budgets_and_hints_follow_the_load():
    admission = Admission(max_concurrent=2, max_bulk=1)
    bulk = admission.acquire(BULK)
    with pytest.raises(Overloaded) as full_bulk:
        admission.acquire(BULK)
    assert full_bulk.value.retry_after > 0
    first = admission.acquire(INTERACTIVE)  # the bulk lane being full does not matter here
    admission.acquire(INTERACTIVE)
    with pytest.raises(Overloaded, match="2 interactive requests in flight"):
        admission.acquire(INTERACTIVE)
    lane = admission.lanes[INTERACTIVE]
    lane.mean_hold = 0.1
    hints = [admission.hint(INTERACTIVE) for _ in range(8)]
    assert hints[-1] > 2 * hints[0]  # later refusals are told to come back later: retries spread out
    lane.refused.clear()
    quick = admission.hint(INTERACTIVE)
    lane.refused.clear()
    lane.mean_hold = 2.0  # calls now hold permits longer: the hint grows with it
    assert admission.hint(INTERACTIVE) > 10 * quick
    admission.release(INTERACTIVE, first)
    admission.release(BULK, bulk)
    assert admission.acquire(BULK)


async def test_waiting_for_a_permit_is_fifo_bounded_and_cancel_safe():
    admission = Admission(max_concurrent=1, max_bulk=1)
    held = admission.acquire(BULK)
    order = []

    async def take(name: str) -> None:
        async with admission.permit(BULK, timeout=5):
            order.append(name)
            await asyncio.sleep(0.01)

    waiters = [asyncio.create_task(take(n)) for n in "abc"]
    await eventually(lambda: len(admission.lanes[BULK].waiters) == 3, what="three waiters queueing")
    assert order == []
    cancelled = asyncio.create_task(take("never"))
    await eventually(lambda: len(admission.lanes[BULK].waiters) == 4, what="the fourth waiter queueing")
    cancelled.cancel()
    admission.release(BULK, held)
    await asyncio.gather(*waiters)
    assert order == ["a", "b", "c"]
    assert admission.lanes[BULK].in_use == 0  # the cancelled waiter kept nothing
    admission.acquire(BULK)
    with pytest.raises(DeadlineExceeded):
        await admission.acquire_waiting(BULK, timeout=0.05)


async def test_a_cancellation_that_arrives_as_the_permit_is_granted_is_honoured():
    """The permit is handed to a waiter and the waiter's task is cancelled in the same loop
    turn: the call must end cancelled (asyncio.wait_for on Python 3.11 would swallow the
    cancellation and run it) and the permit must pass on, not leak."""
    admission = Admission(max_concurrent=1, max_bulk=1)
    held = admission.acquire(BULK)
    first = asyncio.create_task(admission.acquire_waiting(BULK, timeout=5))
    second = asyncio.create_task(admission.acquire_waiting(BULK, timeout=5))
    await eventually(lambda: len(admission.lanes[BULK].waiters) == 2, what="two waiters queueing")
    admission.release(BULK, held)  # grants `first`'s permit...
    first.cancel()  # ...and its caller leaves before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the permit went on to the next waiter
    assert admission.lanes[BULK].in_use == 1 and not admission.lanes[BULK].waiters


@pytest.fixture
async def shedding_stack():
    backend = FakeBackend(delay=0.2)
    settings = Settings(port=0, max_concurrent_requests=2, max_bulk_requests=2, health_poll_interval=0.05)
    gateway = await create_gateway(settings, backend, build_catalog([minilm_spec()]))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    yield backend, embed_pb2_grpc.EmbedStub(channel)
    await channel.close()
    await gateway.stop(0)


async def test_every_resource_exhausted_carries_a_retry_hint(shedding_stack):
    backend, stub = shedding_stack
    calls = [stub.Embed(embed_pb2.EmbedRequest(inputs=[f"t{i}"]), timeout=10) for i in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(rejected) == 4
    for error in rejected:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = {key: value for key, value in error.trailing_metadata()}
        pushback = int(trailers["grpc-retry-pushback-ms"])
        assert pushback >= 10
        status = rpc_status.from_call(error)
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info)
        assert info.retry_delay.ToMilliseconds() == pushback


async def test_bulk_calls_do_not_take_interactive_permits(shedding_stack):
    backend, stub = shedding_stack
    bulk = [
        stub.Embed(embed_pb2.EmbedRequest(inputs=[f"bulk {i}"], priority=common_pb2.PRIORITY_BULK), timeout=10)
        for i in range(2)
    ]
    interactive = [stub.Embed(embed_pb2.EmbedRequest(inputs=[f"query {i}"]), timeout=10) for i in range(2)]
    results = await asyncio.gather(*bulk, *interactive, return_exceptions=True)
    assert not [r for r in results if isinstance(r, Exception)]
    assert sorted(backend.lanes) == [BULK, BULK, INTERACTIVE, INTERACTIVE]  # Triton priority follows the lane


async def test_each_stream_message_takes_a_bulk_permit(shedding_stack):
    backend, stub = shedding_stack

    async def messages():
        for i in range(8):
            yield embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.EmbedRequest(inputs=[f"doc {i}"]))

    stream = stub.EmbedStream(messages(), timeout=60)
    await eventually(lambda: backend.lanes.count(BULK) == 2, what="the stream holding both bulk permits")
    # 8 messages in flight but only 2 bulk permits: the interactive lane stays free.
    queries = await asyncio.gather(*(stub.Embed(embed_pb2.EmbedRequest(inputs=["q"]), timeout=10) for _ in range(2)))
    assert len(queries) == 2
    answers = [a async for a in stream]
    assert sorted(a.id for a in answers) == [str(i) for i in range(8)]
    assert all(a.HasField("response") for a in answers)
    assert backend.lanes.count(BULK) == 8


async def test_a_cancelled_stream_leaves_no_work_behind(shedding_stack):
    backend, stub = shedding_stack

    async def messages():
        for i in range(20):
            yield embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.EmbedRequest(inputs=[f"doc {i}"]))

    call = stub.EmbedStream(messages(), timeout=60)
    await eventually(lambda: backend.calls >= 2, what="the stream's first messages reaching the model")
    call.cancel()
    started = backend.calls
    # Twice the time the 20 messages would take two at a time (0.2 s each), had they been kept.
    await asyncio.sleep(2 * 20 / 2 * backend.delay)
    # Messages waiting for a bulk permit were dropped with the stream, not sent to the model.
    assert backend.calls <= started + 2 < 20
