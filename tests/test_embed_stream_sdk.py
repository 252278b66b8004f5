"""The SDK's bulk embedding (`embed_stream`, `embed_stream_batches`): against a scripted local
EmbedStream server (order, bounded in-flight messages, retries, progress, broken streams),
then 10,000 texts in order against the real gateway."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

import ragserve
from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc

DIM = 4


def vector_of(text: str) -> list[float]:
    return [float(text.removeprefix("t")), 1.0, 2.0, 3.0]


class ScriptedEmbed(embed_pb2_grpc.EmbedServicer):
    """Answers each message with vectors [index, 1, 2, 3], in pairs swapped (out of order);
    `refuse[id]` = how many times to answer that message RESOURCE_EXHAUSTED first; `break_after`
    ends the first stream UNAVAILABLE after that many answers; `bad_id` answers INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.refuse: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.break_after: int | None = None
        self.bad_id: str | None = None
        self.max_outstanding = 0
        self.streams = 0

    def EmbedStream(self, request_iterator, context):
        self.streams += 1
        inbox: queue.Queue = queue.Queue()
        outstanding = [0]
        lock = threading.Lock()

        def read() -> None:
            try:
                for message in request_iterator:
                    with lock:
                        outstanding[0] += 1
                        self.max_outstanding = max(self.max_outstanding, outstanding[0])
                    inbox.put(message)
            except grpc.RpcError:  # the client cancelled
                pass
            inbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        held, answered, ended = [], 0, False
        while not ended or held:
            try:
                item = inbox.get(timeout=0.02)
            except queue.Empty:
                item = "idle"
            if item is None:
                ended = True
            elif item != "idle":
                held.append(item)
                if len(held) < 2:
                    continue
            for message in reversed(held):  # out of order
                with lock:
                    outstanding[0] -= 1
                if self.break_after is not None and answered >= self.break_after and self.streams == 1:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "replica went away")
                answered += 1
                yield self.answer(message)
            held = []

    def answer(self, message: embed_pb2.EmbedStreamRequest) -> embed_pb2.EmbedStreamResponse:
        self.attempts[message.id] = self.attempts.get(message.id, 0) + 1
        if message.id == self.bad_id:
            return embed_pb2.EmbedStreamResponse(id=message.id, error=common_pb2.StreamError(code=3, message="input 1 is bad"))
        if self.refuse.get(message.id, 0) >= self.attempts[message.id]:
            return embed_pb2.EmbedStreamResponse(id=message.id, error=common_pb2.StreamError(code=8, message="bulk lane full"))
        values = np.array([vector_of(t) for t in message.request.inputs], dtype="<f4")
        response = embed_pb2.EmbedResponse(
            model="scripted",
            encoding=embed_pb2.EMBEDDING_ENCODING_FLOAT32_BYTES,
            usage=common_pb2.Usage(prompt_tokens=len(values), total_tokens=len(values)),
            packed=embed_pb2.PackedEmbeddings(
                data=values.tobytes(), rows=len(values), columns=DIM, element_type=embed_pb2.ELEMENT_TYPE_FLOAT32, dimensions=DIM
            ),
        )
        return embed_pb2.EmbedStreamResponse(id=message.id, response=response)


@pytest.fixture
def scripted():
    servicer = ScriptedEmbed()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    embed_pb2_grpc.add_EmbedServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def texts(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


def test_results_in_input_order_with_bounded_in_flight(scripted):
    servicer, address = scripted
    seen = []
    with ragserve.Client(address) as client:
        result = client.embed_stream(texts(1000), batch_size=7, max_in_flight=3, on_progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(result.embeddings[:, 0], np.arange(1000))
    assert result.embeddings.shape == (1000, DIM) and result.embeddings.dtype == np.float32
    assert (result.model, result.usage.prompt_tokens, result.encoding) == ("scripted", 1000, "float32")
    assert servicer.max_outstanding <= 3
    assert seen[-1] == (1000, 1000) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_generator_input_and_batches_in_order(scripted):
    _, address = scripted
    with ragserve.Client(address) as client:
        batches = list(client.embed_stream_batches((t for t in texts(100)), batch_size=16, max_in_flight=4))
    assert [b.start for b in batches] == list(range(0, 100, 16))
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches])[:, 0], np.arange(100))


def test_refused_messages_are_retried(scripted):
    servicer, address = scripted
    servicer.refuse = {"0": 2, "3": 1}
    with ragserve.Client(address) as client:
        result = client.embed_stream(texts(50), batch_size=10)
    np.testing.assert_array_equal(result.embeddings[:, 0], np.arange(50))
    assert servicer.attempts["0"] == 3 and servicer.attempts["3"] == 2


def test_retries_run_out(scripted):
    servicer, address = scripted
    servicer.refuse = {"1": 10}
    with ragserve.Client(address) as client, pytest.raises(ragserve.OverloadedError, match=r"inputs 10\.\.19 \(after 2 retries\): bulk lane full"):
        client.embed_stream(texts(50), batch_size=10, retries=2)


def test_other_errors_end_the_run_naming_the_texts(scripted):
    servicer, address = scripted
    servicer.bad_id = "2"
    with ragserve.Client(address) as client:
        with pytest.raises(ragserve.InvalidArgumentError, match=r"inputs 20\.\.29: input 1 is bad"):
            client.embed_stream(texts(50), batch_size=10)
        with pytest.raises(ragserve.InvalidArgumentError, match="input 3 is an empty string"):
            client.embed_stream(["a", "b", "c", ""])
        with pytest.raises(ragserve.InvalidArgumentError, match="batch_size must be an int from 1 to 2048, got 0"):
            client.embed_stream(["a"], batch_size=0)
        with pytest.raises(ragserve.InvalidArgumentError, match="not one str"):
            client.embed_stream("abc")


def test_a_broken_stream_is_reopened(scripted):
    servicer, address = scripted
    servicer.break_after = 5
    with ragserve.Client(address) as client:
        result = client.embed_stream(texts(200), batch_size=10, max_in_flight=4)
    np.testing.assert_array_equal(result.embeddings[:, 0], np.arange(200))
    assert servicer.streams == 2


def test_progress_bar(scripted, capsys):
    _, address = scripted
    with ragserve.Client(address) as client:
        client.embed_stream(texts(64), batch_size=8, progress=True)
    assert "64/64" in capsys.readouterr().err


def test_empty_input(scripted):
    _, address = scripted
    with ragserve.Client(address) as client:
        assert client.embed_stream([]).embeddings.shape[0] == 0


async def test_async_client_takes_async_iterables(scripted):
    servicer, address = scripted
    servicer.refuse = {"2": 1}

    async def produce():
        for text in texts(300):
            yield text

    async with ragserve.AsyncClient(address) as client:
        result = await client.embed_stream(produce(), batch_size=16, max_in_flight=4)
        np.testing.assert_array_equal(result.embeddings[:, 0], np.arange(300))
        starts = [b.start async for b in client.embed_stream_batches(texts(40), batch_size=16)]
        assert starts == [0, 16, 32]
    assert servicer.max_outstanding <= 4


# --- against the real gateway -------------------------------------------------------------


@pytest.mark.integration
def test_ten_thousand_texts_in_order(gateway):
    corpus = [f"passage {i}: the {['red', 'green', 'blue', 'gray'][i % 4]} fox number {i} jumps" for i in range(10_000)]
    seen = []
    with ragserve.Client(gateway.address, timeout=30) as client:
        started = time.perf_counter()
        result = client.embed_stream(corpus, batch_size=64, max_in_flight=8, on_progress=lambda d, t: seen.append(d))
        elapsed = time.perf_counter() - started
        assert result.embeddings.shape == (10_000, 384) and result.embeddings.dtype == np.float32
        assert seen[-1] == 10_000
        # In order: spot rows equal the same texts embedded one call at a time.
        picks = [0, 1, 63, 64, 4_999, 9_998, 9_999]
        direct = client.embed([corpus[i] for i in picks]).embeddings
        np.testing.assert_allclose(result.embeddings[picks], direct, atol=1e-5)
        assert result.usage.prompt_tokens == sum(r.count for i in range(0, 10_000, 2048) for r in client.tokenize(corpus[i : i + 2048]).results)
    print(f"10,000 texts in {elapsed:.1f} s ({10_000 / elapsed:.0f}/s)")


@pytest.mark.integration
async def test_async_stream_int8_against_the_gateway(gateway):
    corpus = [f"document {i} about topic {i % 17}" for i in range(1_000)]

    async def produce():
        for text in corpus:
            yield text

    async with ragserve.AsyncClient(gateway.address, timeout=30) as client:
        result = await client.embed_stream(produce(), encoding="int8", batch_size=100)
        direct = await client.embed(corpus[:100], encoding="int8")
    assert result.embeddings.dtype == np.int8 and result.encoding == "int8" and result.dimensions == 384
    # Different Triton batches: a value on a quantisation boundary may sit one step away.
    diff = np.abs(result.embeddings[:100].astype(np.int16) - direct.embeddings.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
