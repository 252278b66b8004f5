"""The priority Triton actually receives per lane, and bulk work yielding to interactive work,
against real processes (issue 25, load shedding).

A recording gRPC proxy sits between a real gateway and a real Triton: a generic handler that
forwards every call's raw bytes to Triton and parses each ModelInferRequest (tritonclient's
service_pb2) to record its `priority` parameter, its rows and when it was sent and answered.

What "yielding" is checked by, and why: Triton's statistics (ModelStatistics) are per model
and per batch size, not per priority, so they cannot say whose request waited. They do show
the executions' sizes, which is how the gateway's bulk gate makes bulk work yield (bulk
executions of at most CPU_BULK_ROWS rows, so no interactive query waits behind a 64-row one);
that is asserted from Triton's batch statistics. Triton's own priority queue is checked on
the wire: with the gate off, bulk requests pile up in Triton's queue, and an interactive
request sent then is answered before bulk requests that were queued before it, more of them
than the model's running executions can hold (a FIFO queue would answer it after them all).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import InferenceServerClient, service_pb2

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from ragserve_server.encoding.coalescer import CPU_BULK_ROWS
from support import GatewayProcess, start_triton, wait_until

pytestmark = pytest.mark.integration

PASSAGE = "Retrieval systems index passages like this one so that a query can find them later. " * 3
BULK_ROWS = 16  # passages per EmbedStream message
_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class RecordingProxy(grpc.GenericRpcHandler):
    """Forwards every RPC to `target` as raw bytes; records each ModelInfer request."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=_OPTIONS)
        self.lock = threading.Lock()
        self.records: list[dict] = []  # model, priority (None: not set), rows, sent, answered
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=_OPTIONS, handlers=[self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details):
        method = details.method
        if method.endswith("/ModelStreamInfer"):
            forward_stream = self.channel.stream_stream(method)
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: forward_stream(requests, metadata=context.invocation_metadata())
            )
        forward = self.channel.unary_unary(method)

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            record = None
            if method.endswith("/ModelInfer"):
                parsed = service_pb2.ModelInferRequest.FromString(request)
                record = {
                    "model": parsed.model_name,
                    "priority": parsed.parameters["priority"].uint64_param if "priority" in parsed.parameters else None,
                    "rows": parsed.inputs[0].shape[0],
                    "sent": time.monotonic(),
                    "answered": None,
                }
                with self.lock:
                    self.records.append(record)
            try:
                return forward(request, timeout=context.time_remaining(), metadata=context.invocation_metadata())
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())
            finally:
                if record is not None:
                    record["answered"] = time.monotonic()

        return grpc.unary_unary_rpc_method_handler(unary)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.records]

    def pending_bulk(self) -> int:
        """Bulk requests (BULK_ROWS rows: the gate is off) sent to Triton and not answered yet."""
        with self.lock:
            return sum(1 for r in self.records if r["rows"] == BULK_ROWS and r["answered"] is None)

    def close(self) -> None:
        self.server.stop(None)
        self.channel.close()


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    server = start_triton(tmp_path_factory.mktemp("priority_wire_triton"), ["minilm"])
    yield server
    server.stop()


@pytest.fixture
def proxy(triton):
    recorder = RecordingProxy(triton.grpc_url)
    yield recorder
    recorder.close()


def priority_levels(triton) -> tuple[int, int]:
    """(interactive, bulk) levels as minilm's config declares them: its default level (the
    highest, 1) and its last level."""
    batching = InferenceServerClient(triton.grpc_url).get_model_config("minilm").config.dynamic_batching
    assert batching.priority_levels >= 2, "minilm's config declares no priority levels"
    return batching.default_priority_level, batching.priority_levels


def batch_sizes(triton) -> dict[int, int]:
    """Triton's executions of minilm so far, by batch size."""
    stats = InferenceServerClient(triton.grpc_url).get_inference_statistics("minilm").model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def bulk_message(i: int) -> embed_pb2.EmbedStreamRequest:
    return embed_pb2.EmbedStreamRequest(
        id=str(i), request=embed_pb2.EmbedRequest(inputs=[f"{i} {PASSAGE}"] * BULK_ROWS, truncate=common_pb2.TRUNCATE_END)
    )


async def test_each_lane_reaches_triton_at_its_configured_priority_and_bulk_runs_in_short_executions(triton, proxy, tmp_path):
    interactive_level, bulk_level = priority_levels(triton)
    gateway = GatewayProcess(proxy.address, ["minilm"], tmp_path / "gateway.log").wait_serving()  # the defaults
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = embed_pb2_grpc.EmbedStub(channel)
            for i in range(3):  # one at a time: nothing else is in flight
                await stub.Embed(embed_pb2.EmbedRequest(inputs=[f"interactive query {i}"]), timeout=60)
            interactive = proxy.snapshot()
            before = batch_sizes(triton)

            async def messages():
                for i in range(4):
                    yield bulk_message(i)

            answers = [a async for a in stub.EmbedStream(messages(), timeout=240)]
            assert [a.HasField("response") for a in answers] == [True] * 4
            bulk = proxy.snapshot()[len(interactive) :]
            after = batch_sizes(triton)
    finally:
        gateway.stop()

    assert len(interactive) == 3 and {r["priority"] for r in interactive} == {interactive_level}
    assert bulk and {r["priority"] for r in bulk} == {bulk_level}
    # The gate cut each 16-passage message into bulk requests of at most CPU_BULK_ROWS rows...
    assert sum(r["rows"] for r in bulk) == 4 * BULK_ROWS and max(r["rows"] for r in bulk) <= CPU_BULK_ROWS
    # ...and Triton executed the bulk job in batches of at most that many rows.
    executed = {size: count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
    assert executed and max(executed) <= CPU_BULK_ROWS, f"executions by batch size during the bulk job: {executed}"
    assert sum(size * count for size, count in executed.items()) == 4 * BULK_ROWS


async def test_interactive_requests_overtake_queued_bulk_requests_in_tritons_queue(triton, proxy, tmp_path):
    instances = InferenceServerClient(triton.grpc_url).get_model_config("minilm").config.instance_group[0].count
    max_batch = InferenceServerClient(triton.grpc_url).get_model_config("minilm").config.max_batch_size
    # Requests the running executions can hold at most: beyond that, bulk requests sent before
    # an interactive one but answered after it waited in the queue while it went ahead.
    running = instances * (max_batch // BULK_ROWS)
    gateway = GatewayProcess(
        proxy.address, ["minilm"], tmp_path / "gateway.log", "--bulk-rows", "0", "--bulk-in-flight", "0"  # the gate off
    ).wait_serving()
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = embed_pb2_grpc.EmbedStub(channel)
            await stub.Embed(embed_pb2.EmbedRequest(inputs=["warm up"]), timeout=60)
            stop = asyncio.Event()

            async def messages():
                i = 0
                while not stop.is_set():
                    yield bulk_message(i)
                    i += 1
                    await asyncio.sleep(0)

            stream = stub.EmbedStream(messages(), timeout=240)
            drain = asyncio.ensure_future(_drain(stream))
            overtaken = []
            try:
                for i in range(3):
                    await asyncio.to_thread(
                        wait_until, lambda: proxy.pending_bulk() >= 3 * running, 120, "bulk requests queued in Triton"
                    )
                    sent = time.monotonic()
                    await stub.Embed(embed_pb2.EmbedRequest(inputs=[f"interactive query {i}"]), timeout=120)
                    records = proxy.snapshot()
                    # Told apart by their rows, not their priority: what is checked is what Triton does.
                    (mine,) = [r for r in records if r["rows"] == 1 and r["sent"] >= sent]
                    overtaken.append(
                        sum(
                            1
                            for r in records
                            if r["rows"] == BULK_ROWS and r["sent"] < mine["sent"]
                            and (r["answered"] is None or r["answered"] > mine["answered"])
                        )
                    )
            finally:
                stop.set()
                stream.cancel()
                await asyncio.gather(drain, return_exceptions=True)
    finally:
        gateway.stop()
    print(f"bulk requests overtaken by each interactive request: {overtaken}; running executions hold at most {running}")
    # Each interactive request went ahead of more queued bulk requests than executions could hold.
    assert min(overtaken) > running, f"bulk requests sent before and answered after each interactive one: {overtaken}"


async def _drain(call) -> None:
    async for _ in call:
        pass
