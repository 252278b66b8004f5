"""Load shedding against the real stack: expired work is never computed, overload answers
carry retry hints, and nothing hangs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import tritonclient.grpc as triton_grpc

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from support import GatewayProcess, eventually, metric_value

pytestmark = pytest.mark.integration

BUSY_ROUNDS = 3  # calls of 64 long passages per minilm instance: one runs on each, the rest wait
LONG = "a long passage about retrieval augmented generation and vector search " * 20  # ~250 tokens


def minilm_stats(triton) -> dict[str, int]:
    stats = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics("minilm", as_json=True)
    inference = stats["model_stats"][0]["inference_stats"]
    return {key: int(inference.get(key, {}).get("count", 0)) for key in ("success", "fail", "queue", "compute_infer")}


def pending(triton) -> float:
    """Requests in minilm's Triton queue, not yet executing (Triton's own gauge)."""
    return metric_value(triton.metrics_url, "nv_inference_pending_request_count", model="minilm")


async def until(predicate, what: str, timeout: float = 60.0):
    return await eventually(lambda: predicate(), timeout=timeout, what=what, interval=0.02)


async def test_requests_expired_or_cancelled_in_the_queue_are_not_computed(gateway, triton):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm"]), timeout=30)
        before = minilm_stats(triton)
        instances = triton_grpc.InferenceServerClient(triton.grpc_url).get_model_config("minilm").config.instance_group[0].count
        # Busy the model: calls of 64 long passages (one Triton request each, seconds of compute),
        # enough that a full round of them still waits in Triton's queue, ahead of everything
        # below, after the cancellations: nothing queued behind can then reach an instance until
        # one more busy call has been computed, which takes far longer than the short deadline.
        busy_count = BUSY_ROUNDS * instances
        busy = [
            stub.Embed(embed_pb2.EmbedRequest(inputs=[f"{i} {LONG}"] * 64, truncate=common_pb2.TRUNCATE_END), timeout=300)
            for i in range(busy_count)
        ]
        busy_tasks = [asyncio.ensure_future(call) for call in busy]
        # Proof the model is busy: every instance executes one, the others wait in Triton's queue.
        await until(lambda: pending(triton) >= 1, "the busy work queueing in Triton")
        # Calls whose caller gives up (cancels) while they queue are cancelled in Triton too.
        abandoned = [
            asyncio.ensure_future(stub.Embed(embed_pb2.EmbedRequest(inputs=[f"abandoned {i}"]), timeout=120)) for i in range(5)
        ]
        # Two reach Triton's queue (the coalescer's two slots for their shape); it holds the rest.
        busy_waiting = lambda: max(0, sum(not task.done() for task in busy_tasks) - instances)  # noqa: E731
        await until(lambda: pending(triton) - busy_waiting() >= 2, "the abandoned calls queueing in Triton")
        for call in abandoned:
            call.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        # A round of busy calls still waits ahead of the short queries: at most one round has
        # finished. (Triton may count a success a little after the instance is free, so this
        # check alone could miss one late count; the second round's seconds of compute are the
        # margin that keeps the queued round ahead of the short queries regardless.)
        finished = minilm_stats(triton)["success"] - before["success"]
        assert busy_count - instances - finished >= instances, f"{finished} busy calls finished before the short queries were sent"
        # Short queries with a 0.5 s deadline queue behind the busy work (another length
        # bucket, so they are never batched with it) and expire there.
        short = await asyncio.gather(
            *(stub.Embed(embed_pb2.EmbedRequest(inputs=[f"query {i}"]), timeout=0.5) for i in range(10)),
            return_exceptions=True,
        )
        assert not all(task.done() for task in busy_tasks), "the busy work ended before the short queries expired"
        await asyncio.gather(*busy_tasks)
    # Queued requests are dropped when the scheduler next looks at them: wait for an empty queue.
    await until(lambda: pending(triton) == 0, "Triton's queue emptying")
    expired = [r for r in short if isinstance(r, grpc.aio.AioRpcError)]
    assert expired and all(r.code() == grpc.StatusCode.DEADLINE_EXCEEDED for r in expired)
    after = minilm_stats(triton)
    computed = after["compute_infer"] - before["compute_infer"]
    succeeded = after["success"] - before["success"]
    # Only the busy work was computed: every expired or cancelled request left the queue
    # without reaching the model. The first calls of a shape go to Triton's queue and fail
    # there; the gateway's coalescer holds the rest (two requests per shape are in flight)
    # and drops them itself, so they never reach Triton at all.
    assert expired == short  # all 10 expired
    assert computed == succeeded == busy_count
    failed_in_triton = after["fail"] - before["fail"]
    assert failed_in_triton >= 2
    print(f"[expired work] {len(expired)} expired and {len(abandoned)} cancelled; Triton: {failed_in_triton} failed in its queue, {computed} computed, {succeeded} succeeded")


async def test_overload_at_four_times_capacity_never_hangs_and_hints_every_rejection(triton, tmp_path):
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, tmp_path / "gateway.log",
        "--max-concurrent-requests", "8", "--max-bulk-requests", "4",
    ).wait_serving()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = embed_pb2_grpc.EmbedStub(channel)

            async def unary(i: int):
                try:
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=[f"query {i}", LONG], truncate=common_pb2.TRUNCATE_END), timeout=30)
                    return "OK", None
                except grpc.aio.AioRpcError as exc:
                    pushback = {k: v for k, v in exc.trailing_metadata() or ()}.get("grpc-retry-pushback-ms")
                    return exc.code().name, pushback

            async def stream(s: int):
                async def messages():
                    for i in range(6):
                        yield embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.EmbedRequest(inputs=[f"doc {s} {i}"]))

                return [a async for a in stub.EmbedStream(messages(), timeout=60)]

            results = await asyncio.wait_for(
                asyncio.gather(*(unary(i) for i in range(32)), *(stream(s) for s in range(4))), timeout=90
            )
        unary_results, stream_results = results[:32], results[32:]
        codes = {code for code, _ in unary_results}
        assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        rejected = [pushback for code, pushback in unary_results if code == "RESOURCE_EXHAUSTED"]
        assert rejected, "32 calls at capacity 8 must shed some"
        assert all(p is not None and int(p) > 0 for p in rejected)
        # Streams wait for bulk permits instead of failing: every message answered.
        for answers in stream_results:
            assert sorted(a.id for a in answers) == [str(i) for i in range(6)]
            assert all(a.HasField("response") for a in answers)
    finally:
        gateway.stop()


async def test_the_sdk_with_retries_completes_a_job_the_bare_client_partly_fails(triton, tmp_path):
    import ragserve

    gateway = GatewayProcess(triton.grpc_url, triton.models, tmp_path / "gateway.log", "--max-concurrent-requests", "4").wait_serving()
    texts = [[f"job item {i}", LONG] for i in range(16)]
    try:
        async with ragserve.AsyncClient(gateway.address, retries=0, timeout=60) as bare:
            results = await asyncio.gather(*(bare.embed(t, truncate="end") for t in texts), return_exceptions=True)
        failed = [r for r in results if isinstance(r, ragserve.OverloadedError)]
        unexpected = [repr(r) for r in results if not isinstance(r, (ragserve.EmbedResult, ragserve.OverloadedError))]
        assert failed and not unexpected, unexpected
        async with ragserve.AsyncClient(gateway.address, retries=4, timeout=60) as patient:
            results = await asyncio.gather(*(patient.embed(t, truncate="end") for t in texts), return_exceptions=True)
        errors = [repr(r) for r in results if not isinstance(r, ragserve.EmbedResult)]
        assert not errors, errors[:3]
        print(f"[retries] bare client: {len(failed)} of {len(texts)} refused; with retries: all {len(texts)} done")
    finally:
        gateway.stop()
