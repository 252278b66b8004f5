"""`Client` (blocking) and `AsyncClient` (asyncio) for a ragserve gateway.

    with ragserve.Client("127.0.0.1:50051") as client:
        result = client.embed(["hello", "world"])
        result.embeddings.shape  # (2, 384)
        ranked = client.rerank("capital of France", ["Berlin is ...", "Paris is ..."], top_n=1)
        ranked.results[0].index  # 1

    async with ragserve.AsyncClient("127.0.0.1:50051") as client:
        result = await client.embed(["hello"], dimensions=128, timeout=2.0)

Several gateways: give a target that resolves to all of them and the client spreads its
calls over them (gRPC's `round_robin`, the default: one connection each), e.g. a Kubernetes
headless Service or a static list; `load_balancing="pick_first"` keeps one connection:

    ragserve.Client("dns:///ragserve-gateway-headless.default.svc.cluster.local:50051")
    ragserve.Client("ipv4:10.0.0.5:50051,10.0.0.6:50051")

A gateway with TLS and API keys (certificate arguments: PEM bytes or file paths):

    ragserve.Client("gateway.internal:50051", api_key=os.environ["RAGSERVE_API_KEY"], root_certificates="ca.pem")
    ragserve.Client("gateway.internal:50051", api_key=key, root_certificates="ca.pem",
                    certificate_chain="client.pem", private_key="client.key")  # mTLS

Every method is defined once (`_Methods`) for both clients; only the transport differs:
`Client` returns results, `AsyncClient` awaitables (and an async iterator for `stream`).
Results carry the server's `request_id`; `metadata=` adds metadata to one call.

Retries: Embed, Rerank and ListModels are retried on UNAVAILABLE and RESOURCE_EXHAUSTED (gRPC's
retry policy in the channel's service config, honouring the server's pushback), `retries=3` by
default, `retries=0` off; Generate and the streams are never retried.

Channel options (gRPC's names), e.g. keepalive through idle-killing proxies and large calls
(a server answers pings more frequent than it allows with GOAWAY too_many_pings: gRPC servers
allow one per 5 minutes without data unless configured otherwise):

    ragserve.Client(target, options=[
        ("grpc.keepalive_time_ms", 60_000),            # ping the connection every 60 s while calls run
        ("grpc.keepalive_timeout_ms", 10_000),         # and drop it when a ping goes unanswered 10 s
        ("grpc.max_receive_message_length", 64 << 20), # answers up to 64 MiB (default 4 MiB)
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.ssl_target_name_override", "gateway.internal"),  # TLS name when dialling an IP
    ])
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, Unpack

import grpc

from ragserve import _bulk, _channel, _protocol
from ragserve._channel import Pem
from ragserve._options import EmbedOptions, GenerateOptions, RerankOptions, TokenizeOptions
from ragserve._errors import from_rpc_error
from ragserve._tracing import with_trace_context
from ragserve._types import EmbedBatch, EmbedResult, GenerateResult, ModelInfo, RerankResult, TextDelta, TokenizeResult
from ragserve.v1 import embed_pb2_grpc, generate_pb2_grpc, models_pb2, models_pb2_grpc, rerank_pb2_grpc, tokenize_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


Metadata = Sequence[tuple[str, str]]


class _Stubs:
    def __init__(self, channel) -> None:
        self.embed = embed_pb2_grpc.EmbedStub(channel)
        self.models = models_pb2_grpc.ModelsStub(channel)
        self.generate = generate_pb2_grpc.GenerateStub(channel)
        self.rerank = rerank_pb2_grpc.RerankStub(channel)
        self.tokenize = tokenize_pb2_grpc.TokenizeStub(channel)


def _with_request_id(result, request_id: str | None):
    if request_id is not None and dataclasses.is_dataclass(result) and any(f.name == "request_id" for f in dataclasses.fields(result)):
        return dataclasses.replace(result, request_id=request_id)
    return result


# What each shared method returns: the result itself (Client) or an awaitable of it (AsyncClient).
_Embed = TypeVar("_Embed")
_Rerank = TypeVar("_Rerank")
_Generate = TypeVar("_Generate")
_Stream = TypeVar("_Stream")
_Models = TypeVar("_Models")
_Tokenize = TypeVar("_Tokenize")
_Detokenize = TypeVar("_Detokenize")


class _Methods(Generic[_Embed, _Rerank, _Generate, _Stream, _Models, _Tokenize, _Detokenize]):
    """Each call's options and meaning, written once; `_unary` and `_stream` are the transport."""

    _stub_sets: list[_Stubs]
    _rotation: Iterator[_Stubs]
    _timeout: float | None
    _metadata: tuple[tuple[str, str], ...]

    @property
    def _stubs(self) -> _Stubs:
        """The stubs of the next connection, in turn (one connection: always the same)."""
        return next(self._rotation)

    def _use_channels(self, channels: list) -> None:
        self._channels = channels
        self._stub_sets = [_Stubs(channel) for channel in channels]
        self._rotation = itertools.cycle(self._stub_sets)

    def _unary(self, method, request, parse: Callable[[Any], Any], timeout: float | None, metadata: Metadata) -> Any:
        raise NotImplementedError

    def _stream(self, method, request, timeout: float | None, metadata: Metadata) -> Any:
        raise NotImplementedError

    def _call_metadata(self, metadata: Metadata) -> tuple[tuple[str, str], ...]:
        return with_trace_context((*self._metadata, *_channel.call_metadata(metadata, None)))

    def embed(
        self, inputs: str | Sequence[str], *, timeout: float | None = None, metadata: Metadata = (), **options: Unpack[EmbedOptions]
    ) -> _Embed:
        """Embeds texts. Options (`EmbedOptions`): model, normalize, truncate, dimensions,
        input_type, encoding="float32"."""
        request = _protocol.embed_request(inputs, **options)
        return self._unary(self._stubs.embed.Embed, request, _protocol.embed_result, timeout, metadata)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[RerankOptions],
    ) -> _Rerank:
        """Orders `documents` by relevance to `query`, best first; `relevance_score` is in [0, 1]
        for every reranker. Options (`RerankOptions`): model, top_n, return_documents, truncate,
        raw_scores, chunk_long_documents."""
        request = _protocol.rerank_request(query, documents, **options)
        return self._unary(self._stubs.rerank.Rerank, request, _protocol.rerank_result, timeout, metadata)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, metadata: Metadata = (), **options: Unpack[GenerateOptions]
    ) -> _Generate:
        """Generates a completion for `prompt` (raw text) or `messages=` (chat). Options
        (`GenerateOptions`): messages, model, max_tokens, temperature (0 = greedy), top_p, top_k,
        min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop,
        stop_token_ids, logprobs, top_logprobs."""
        request = _protocol.generate_request(prompt, **options)
        return self._unary(self._stubs.generate.Generate, request, _protocol.generate_result, timeout, metadata)

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, metadata: Metadata = (), **options: Unpack[GenerateOptions]
    ) -> _Stream:
        """Like `generate`, streamed: `TextDelta`s, then the final `GenerateResult`.
        Leaving the loop early cancels the generation on the server."""
        request = _protocol.generate_request(prompt, **options)
        return self._stream(self._stubs.generate.GenerateStream, request, timeout, metadata)

    def list_models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> _Models:
        return self._unary(self._stubs.models.ListModels, models_pb2.ListModelsRequest(), _protocol.model_infos, timeout, metadata)

    def tokenize(
        self, inputs: str | Sequence[str], *, timeout: float | None = None, metadata: Metadata = (), **options: Unpack[TokenizeOptions]
    ) -> _Tokenize:
        """Tokens of each text as a model gets them, with Embed's truncation rules: ids,
        character offsets, counts. Options (`TokenizeOptions`): model, truncate, input_type,
        return_tokens."""
        request = _protocol.tokenize_request(inputs, **options)
        return self._unary(self._stubs.tokenize.Tokenize, request, _protocol.tokenize_result, timeout, metadata)

    def detokenize(
        self,
        ids: Sequence[int],
        *,
        model: str | None = None,
        skip_special_tokens: bool = True,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> _Detokenize:
        """The text of token `ids` in `model`'s vocabulary (special tokens left out by default)."""
        request = _protocol.detokenize_request(ids, model=model, skip_special_tokens=skip_special_tokens)
        return self._unary(self._stubs.tokenize.Detokenize, request, lambda response: response.text, timeout, metadata)


class Client(_Methods[EmbedResult, RerankResult, GenerateResult, Iterator[TextDelta | GenerateResult], list[ModelInfo], TokenizeResult, str]):
    """Blocking client. `timeout` (seconds) is the default deadline of every call.

    api_key: sent as `authorization: Bearer <key>` with every call.
    tls, root_certificates: TLS (on with `tls=True` or any certificate); `root_certificates`
        verify the gateway (default: gRPC's bundled roots).
    private_key, certificate_chain: a client certificate, for gateways that require mTLS.
        Each certificate argument is PEM `bytes`, or a `str`/`Path` naming a PEM file.
    retries: Embed, Rerank and ListModels calls answered UNAVAILABLE or RESOURCE_EXHAUSTED are
        tried again up to this many times (0 = off, at most 4), after a jittered exponential
        backoff or the server's `grpc-retry-pushback-ms`, always within the call's deadline.
    metadata: sent with every call (each method's `metadata=` adds to it for one call).
    load_balancing: "round_robin" (default: calls spread over every address the target
        resolves to) or "pick_first" (gRPC's default: all calls on the first that answers).
    options: gRPC channel options, e.g. keepalive and message sizes (see the module docstring).
    connections: TCP connections to open, calls taking them in turn. A gateway run with
        `--workers N` serves each connection from one worker: a busy client opens N or more.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        private_key: Pem | None = None,
        certificate_chain: Pem | None = None,
        retries: int = _channel.DEFAULT_RETRIES,
        metadata: Metadata = (),
        load_balancing: str | None = _channel.DEFAULT_LOAD_BALANCING,
        options: Sequence[tuple[str, object]] = (),
        connections: int = 1,
    ) -> None:
        credentials, channel_options = _channel.settings(
            tls, root_certificates, private_key, certificate_chain, load_balancing, retries, options
        )
        if credentials is None:
            self._use_channels(_channel.open_channels(lambda o: grpc.insecure_channel(target, options=o), connections, channel_options))
        else:
            self._use_channels(_channel.open_channels(lambda o: grpc.secure_channel(target, credentials, options=o), connections, channel_options))
        self._timeout = timeout
        self._metadata = _channel.call_metadata(metadata, api_key)

    def _unary(self, method, request, parse, timeout, metadata):
        try:
            response, call = method.with_call(
                request, timeout=timeout if timeout is not None else self._timeout, metadata=self._call_metadata(metadata)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _with_request_id(parse(response), _protocol.request_id(call.trailing_metadata()))

    def _stream(self, method, request, timeout, metadata) -> Iterator[TextDelta | GenerateResult]:
        call = method(request, timeout=timeout if timeout is not None else self._timeout, metadata=self._call_metadata(metadata))
        try:
            request_id = _protocol.request_id(call.initial_metadata())
            for message in call:
                yield _protocol.stream_event(message, request_id)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def embed_stream(self, texts: Iterable[str], **options: Unpack[_bulk.EmbedStreamOptions]) -> EmbedResult:
        """Embeds any number of texts over one EmbedStream: `embeddings` in input order (one
        array, ready for np.save), `usage` summed. Options (`_bulk.EmbedStreamOptions`): `embed`'s,
        and batch_size=64, max_in_flight=8, retries=8, progress=False (a tqdm bar),
        on_progress=callable(done, total), total=None, timeout=None (the whole run)."""
        timeout = options.pop("timeout", None)
        run = _bulk.new_run(texts, **options)
        return _bulk.collect(run, _bulk.iter_batches_sync(self._stubs.embed, self._call_metadata(()), run, texts, timeout))

    def embed_stream_batches(self, texts: Iterable[str], **options: Unpack[_bulk.EmbedStreamOptions]) -> Iterator[EmbedBatch]:
        """Like `embed_stream`, batch by batch in input order (bounded memory for any corpus size)."""
        timeout = options.pop("timeout", None)
        run = _bulk.new_run(texts, **options)
        return _bulk.iter_batches_sync(self._stubs.embed, self._call_metadata(()), run, texts, timeout)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient(
    _Methods[
        Awaitable[EmbedResult],
        Awaitable[RerankResult],
        Awaitable[GenerateResult],
        AsyncIterator[TextDelta | GenerateResult],
        Awaitable[list[ModelInfo]],
        Awaitable[TokenizeResult],
        Awaitable[str],
    ]
):
    """asyncio client; the same arguments and calls as `Client`, awaited (`stream`: `async for`)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        private_key: Pem | None = None,
        certificate_chain: Pem | None = None,
        retries: int = _channel.DEFAULT_RETRIES,
        metadata: Metadata = (),
        load_balancing: str | None = _channel.DEFAULT_LOAD_BALANCING,
        options: Sequence[tuple[str, object]] = (),
        connections: int = 1,
    ) -> None:
        credentials, channel_options = _channel.settings(
            tls, root_certificates, private_key, certificate_chain, load_balancing, retries, options
        )
        if credentials is None:
            self._use_channels(_channel.open_channels(lambda o: grpc.aio.insecure_channel(target, options=o), connections, channel_options))
        else:
            self._use_channels(_channel.open_channels(lambda o: grpc.aio.secure_channel(target, credentials, options=o), connections, channel_options))
        self._timeout = timeout
        self._metadata = _channel.call_metadata(metadata, api_key)

    async def _unary(self, method, request, parse, timeout, metadata):
        call = method(request, timeout=timeout if timeout is not None else self._timeout, metadata=self._call_metadata(metadata))
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _with_request_id(parse(response), _protocol.request_id(trailing))

    async def _stream(self, method, request, timeout, metadata) -> AsyncIterator[TextDelta | GenerateResult]:
        call = method(request, timeout=timeout if timeout is not None else self._timeout, metadata=self._call_metadata(metadata))
        try:
            request_id = _protocol.request_id(await call.initial_metadata())
            async for message in call:
                yield _protocol.stream_event(message, request_id)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def embed_stream(
        self, texts: Iterable[str] | AsyncIterable[str], **options: Unpack[_bulk.EmbedStreamOptions]
    ) -> EmbedResult:
        """See `Client.embed_stream`; `texts` may also be an async iterable."""
        timeout = options.pop("timeout", None)
        run = _bulk.new_run(texts, **options)
        return await _bulk.collect_async(run, _bulk.iter_batches_async(self._stubs.embed, self._call_metadata(()), run, texts, timeout))

    def embed_stream_batches(
        self, texts: Iterable[str] | AsyncIterable[str], **options: Unpack[_bulk.EmbedStreamOptions]
    ) -> AsyncIterator[EmbedBatch]:
        """See `Client.embed_stream_batches`: `async for batch in client.embed_stream_batches(texts)`."""
        timeout = options.pop("timeout", None)
        run = _bulk.new_run(texts, **options)
        return _bulk.iter_batches_async(self._stubs.embed, self._call_metadata(()), run, texts, timeout)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
