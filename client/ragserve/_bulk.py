"""Bulk embedding over the EmbedStream RPC: `embed_stream` and `embed_stream_batches`.

    with ragserve.Client() as client:
        result = client.embed_stream(texts, progress=True)     # any iterable of str
        np.save("corpus.npy", result.embeddings)               # float32 (n, 384), input order

        # A corpus larger than memory: batches in input order, written as they come.
        out = np.lib.format.open_memmap("corpus.npy", "w+", np.float32, (n, 384))
        for batch in client.embed_stream_batches(texts, total=n):
            out[batch.start : batch.start + len(batch.embeddings)] = batch.embeddings

How it runs: texts are cut into messages of `batch_size`; at most `max_in_flight` messages
are unanswered at once (a new one goes out as an answer comes back, so memory stays bounded
however long the input); answers are put back in input order. A message answered
RESOURCE_EXHAUSTED or UNAVAILABLE is sent again after a jittered exponential backoff (0.1 s x
2^n, at most 5 s), up to `retries` times; a stream that breaks with UNAVAILABLE is opened
again and its unanswered messages resent (same budget). Any other error ends the run with
the SDK's error for its code, naming the texts of the failed message.

One driver per client kind (threads for `Client`, asyncio for `AsyncClient`) around one
shared state (`_Run`): ids, order, retries, progress.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import random
import threading
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Unpack

import grpc
import numpy as np

from ragserve import _protocol
from ragserve._options import EmbedOptions
from ragserve._errors import InvalidArgumentError, UnavailableError, error_for_code, from_rpc_error
from ragserve._types import EmbedBatch, EmbedResult, Usage
from ragserve.v1 import embed_pb2

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_IN_FLIGHT = 8
MAX_IN_FLIGHT = 64  # the gateway reads at most 64 messages of one stream at once
DEFAULT_RETRIES = 8
_RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
_CODES = {code.value[0]: code for code in grpc.StatusCode}

ProgressCallback = Callable[[int, "int | None"], None]


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (1-based): full jitter over 0.1 s x 2^(attempt-1), at most 5 s."""
    return random.uniform(0.5, 1.0) * min(5.0, 0.1 * 2 ** (attempt - 1))


@dataclass
class _Message:
    seq: int
    start: int
    request: embed_pb2.EmbedStreamRequest
    attempts: int = 0


class _Progress:
    def __init__(self, total: int | None, progress: bool, on_progress: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.on_progress = on_progress
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                warnings.warn("progress=True needs tqdm (pip install tqdm); going on without a bar", stacklevel=4)
            else:
                self.bar = tqdm(total=total, unit="text", desc="embed")

    def add(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Run:
    """One embed_stream run: the messages sent and unanswered, the answers not yet released in
    order, retries and progress. Drivers call `message`, `answer`, `ready`, `may_send`."""

    def __init__(
        self,
        template: embed_pb2.EmbedRequest,
        *,
        batch_size: int,
        max_in_flight: int,
        retries: int,
        total: int | None,
        progress: bool,
        on_progress: ProgressCallback | None,
    ) -> None:
        _check_int("batch_size", batch_size, 1, 2048)
        _check_int("max_in_flight", max_in_flight, 1, MAX_IN_FLIGHT)
        _check_int("retries", retries, 0, 100)
        self.template = template
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.pending: dict[str, _Message] = {}
        self.answered: dict[int, EmbedBatch] = {}
        self.next_seq = 0  # messages made
        self.next_out = 0  # messages released in order
        self.next_start = 0  # texts taken from the input
        self.input_done = False
        self.stream_attempts = 0
        self.model = ""
        self.encoding = template_encoding(template)
        self.dimensions = 0
        self.progress = _Progress(total, progress, on_progress)

    @property
    def finished(self) -> bool:
        return self.input_done and not self.pending

    def may_send(self) -> bool:
        # Bounded: unanswered messages, and answers held back behind a slow (retried) one.
        return (
            not self.input_done
            and len(self.pending) < self.max_in_flight
            and self.next_seq - self.next_out < 4 * self.max_in_flight
        )

    def message(self, texts: list) -> embed_pb2.EmbedStreamRequest:
        start = self.next_start
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidArgumentError(f"input {start + offset} must be a str, got {type(text).__name__}")
            if not text:
                raise InvalidArgumentError(f"input {start + offset} is an empty string")
        request = embed_pb2.EmbedRequest()
        request.CopyFrom(self.template)
        request.inputs.extend(texts)
        message = _Message(self.next_seq, start, embed_pb2.EmbedStreamRequest(id=str(self.next_seq), request=request))
        self.pending[message.request.id] = message
        self.next_seq += 1
        self.next_start += len(texts)
        return message.request

    def answer(self, response: embed_pb2.EmbedStreamResponse) -> tuple[float, embed_pb2.EmbedStreamRequest] | None:
        """Takes one answer; returns (delay, request) when the message is to be sent again."""
        message = self.pending.get(response.id)
        if message is None:
            return None  # a duplicate of a message resent after a stream broke
        count = len(message.request.request.inputs)
        if response.WhichOneof("outcome") == "error":
            code = _CODES.get(response.error.code, grpc.StatusCode.UNKNOWN)
            where = f"embed_stream: inputs {message.start}..{message.start + count - 1}"
            if code in _RETRYABLE and message.attempts < self.retries:
                message.attempts += 1
                return backoff(message.attempts), message.request
            tried = f" (after {message.attempts} retries)" if message.attempts else ""
            raise error_for_code(code, f"{where}{tried}: {response.error.message}")
        del self.pending[response.id]
        result = response.response
        self.model = self.model or result.model
        self.answered[message.seq] = EmbedBatch(message.start, _protocol.embeddings_of(result), _protocol.usage(result.usage))
        self.encoding = _protocol.ENCODING_NAMES.get(result.encoding, "float")
        self.dimensions = result.packed.dimensions if self.encoding != "float" else self.answered[message.seq].embeddings.shape[1]
        self.progress.add(count)
        return None

    def ready(self) -> Iterator[EmbedBatch]:
        """Answers that are next in input order."""
        while self.next_out in self.answered:
            yield self.answered.pop(self.next_out)
            self.next_out += 1

    def stream_broke(self, exc: grpc.RpcError) -> float:
        """The delay before opening the stream again; raises when that is not to be done."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code != grpc.StatusCode.UNAVAILABLE or self.stream_attempts >= self.retries:
            raise from_rpc_error(exc) from None
        self.stream_attempts += 1
        return backoff(self.stream_attempts)

    def unanswered(self) -> list[embed_pb2.EmbedStreamRequest]:
        return [m.request for m in sorted(self.pending.values(), key=lambda m: m.seq)]


def template_encoding(template: embed_pb2.EmbedRequest) -> str:
    return _protocol.ENCODING_NAMES.get(template.encoding, "float")


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an int from {low} to {high}, got {value!r}")


class EmbedStreamOptions(EmbedOptions, total=False):
    """The options of `embed_stream` / `embed_stream_batches` (sync and async), all keyword-only.

    `EmbedOptions` (model, normalize, truncate, dimensions, input_type, encoding): as in `embed`, every message.
    batch_size: texts per message (default 64, at most 2048).
    max_in_flight: messages unanswered at once (default 8, at most 64).
    retries: resends of a message answered RESOURCE_EXHAUSTED / UNAVAILABLE, and reopenings
        of a stream broken by UNAVAILABLE (default 8; 0: the first such error ends the run).
    total: the number of texts, for progress, when `texts` has no len().
    progress: True shows a tqdm bar (when tqdm is installed).
    on_progress: called as on_progress(done, total) after each answered message.
    timeout: seconds for the whole run (default None: no deadline; not the client's per-call timeout).
    """

    batch_size: int
    max_in_flight: int
    retries: int
    total: int | None
    progress: bool
    on_progress: ProgressCallback | None
    timeout: float | None


def new_run(
    texts,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    retries: int = DEFAULT_RETRIES,
    total: int | None = None,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
    **embed_options: Unpack[EmbedOptions],
) -> _Run:
    if isinstance(texts, str):
        raise InvalidArgumentError("texts must be an iterable of str, not one str (use embed for one text)")
    template = _protocol.embed_request([], **embed_options)
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    return _Run(
        template, batch_size=batch_size, max_in_flight=max_in_flight, retries=retries, total=total, progress=progress,
        on_progress=on_progress,
    )


def collect(run: _Run, batches: Iterable[EmbedBatch]) -> EmbedResult:
    parts, prompt_tokens = [], 0
    for batch in batches:
        parts.append(batch.embeddings)
        prompt_tokens += batch.usage.prompt_tokens
    embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return EmbedResult(
        model=run.model,
        embeddings=embeddings,
        usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        encoding=run.encoding,
        dimensions=run.dimensions,
    )


# --- blocking driver (Client) -------------------------------------------------------------


def iter_batches_sync(stub, metadata, run: _Run, texts: Iterable[str], timeout: float | None) -> Iterator[EmbedBatch]:
    chunks = _chunks(iter(texts), run.batch_size)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    timers: list[threading.Timer] = []

    def requests(box: queue.SimpleQueue) -> Iterator[embed_pb2.EmbedStreamRequest]:
        while (item := box.get()) is not None:
            yield item

    def fill() -> None:
        while run.may_send():
            batch = next(chunks, None)
            if batch is None:
                run.input_done = True
            else:
                outbox.put(run.message(batch))

    try:
        fill()
        while not run.finished:
            call = stub.EmbedStream(requests(outbox), timeout=timeout, metadata=metadata)
            try:
                for response in call:
                    retry = run.answer(response)
                    if retry is not None:
                        timer = threading.Timer(retry[0], outbox.put, (retry[1],))
                        timer.daemon = True
                        timer.start()
                        timers.append(timer)
                    yield from run.ready()
                    fill()
                    if run.finished:
                        outbox.put(None)  # half-close: the server ends the stream after its answers
                if not run.finished:
                    raise UnavailableError("embed_stream: the stream ended with messages unanswered")
            except grpc.RpcError as exc:
                delay = run.stream_broke(exc)
                call.cancel()
                for timer in timers:
                    timer.cancel()
                timers.clear()
                outbox.put(None)
                threading.Event().wait(delay)
                outbox = queue.SimpleQueue()
                for request in run.unanswered():
                    outbox.put(request)
                fill()
            finally:
                call.cancel()
        yield from run.ready()
    finally:
        outbox.put(None)
        for timer in timers:
            timer.cancel()
        run.progress.close()


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


# --- asyncio driver (AsyncClient) ---------------------------------------------------------


async def iter_batches_async(
    stub, metadata, run: _Run, texts: Iterable[str] | AsyncIterable[str], timeout: float | None
) -> AsyncIterator[EmbedBatch]:
    chunks = _achunks(texts, run.batch_size)
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue = asyncio.Queue()
    timers: list[asyncio.TimerHandle] = []

    async def requests(box: asyncio.Queue) -> AsyncIterator[embed_pb2.EmbedStreamRequest]:
        while (item := await box.get()) is not None:
            yield item

    async def fill() -> None:
        while run.may_send():
            batch = await anext(chunks, None)
            if batch is None:
                run.input_done = True
            else:
                outbox.put_nowait(run.message(batch))

    try:
        await fill()
        while not run.finished:
            call = stub.EmbedStream(requests(outbox), timeout=timeout, metadata=metadata)
            try:
                async for response in call:
                    retry = run.answer(response)
                    if retry is not None:
                        timers.append(loop.call_later(retry[0], outbox.put_nowait, retry[1]))
                    for batch in run.ready():
                        yield batch
                    await fill()
                    if run.finished:
                        outbox.put_nowait(None)
                if not run.finished:
                    raise UnavailableError("embed_stream: the stream ended with messages unanswered")
            except grpc.RpcError as exc:
                delay = run.stream_broke(exc)
                call.cancel()
                for timer in timers:
                    timer.cancel()
                timers.clear()
                await asyncio.sleep(delay)
                outbox = asyncio.Queue()
                for request in run.unanswered():
                    outbox.put_nowait(request)
                await fill()
            finally:
                call.cancel()
        for batch in run.ready():
            yield batch
    finally:
        for timer in timers:
            timer.cancel()
        await chunks.aclose()
        run.progress.close()


async def _achunks(items: Iterable | AsyncIterable, size: int) -> AsyncIterator[list]:
    if isinstance(items, AsyncIterable):
        batch: list = []
        async for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
    else:
        for batch in _chunks(iter(items), size):
            yield batch


async def collect_async(run: _Run, batches: AsyncIterator[EmbedBatch]) -> EmbedResult:
    parts = [batch async for batch in batches]
    return collect(run, parts)
