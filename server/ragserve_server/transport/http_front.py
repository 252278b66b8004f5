"""The HTTP front: OpenAI- and Cohere-compatible routes on the gateway's own event loop.

    POST /v1/embeddings        OpenAI embeddings (input, model, dimensions, encoding_format float|base64)
    POST /v1/chat/completions  OpenAI chat completions (stream: true -> server-sent events, then [DONE])
    POST /v1/completions       OpenAI completions (same)
    POST /v1/rerank            Cohere / Jina rerank (query, documents, top_n, return_documents)
    GET  /v1/models            the served models
    GET  /health               200 while the gateway serves, 503 otherwise (no key needed)

Starlette on uvicorn, started as a task of the gateway's loop (`--http-port`, 0 = off). Each
route builds the ragserve.v1 request (openai_shapes.py) and calls the same service method as
the gRPC handler, inside the same CallGuard scope (call_scope.py): API keys, admission, the
error table, metrics and the access log are the gRPC ones. Metrics carry the gRPC labels of
the method a route calls (`service="Embed", method="Embed"`; chat and completions are
`Generate/Generate`, or `Generate/GenerateStream` with `stream: true`), so dashboards cover
both transports; the access log line adds `transport="http"`.

Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`code`: the
rejection reason of the metrics, e.g. `overload`, `invalid_input`), with the HTTP status of the
gRPC code; a 429 carries `Retry-After` (whole seconds, at least 1) and `retry-after-ms` (the
hint itself, which the openai client honours). Every response carries `x-request-id` (the
caller's, when it sent a plain one). HTTP calls have no deadline (the client's timeout ends
them by disconnecting; a stream is cancelled then, in the engine too).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

import grpc
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ragserve.v1 import generate_pb2, models_pb2
from ragserve_server.transport import openai_shapes as shapes
from ragserve_server.observability import tracing
from ragserve_server.calls.call_scope import CallFailed, CallGuard
from ragserve_server.models.catalog import GENERATION, Catalog
from ragserve_server.errors import InvalidInput, ModelNotFound
from ragserve_server.services.common import requested_model

log = structlog.get_logger("ragserve.http")

# gRPC code -> HTTP status and OpenAI error type.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_JSON = "application/json"


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(code: grpc.StatusCode, message: str, reason: str) -> tuple[int, dict]:
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    return status, {"error": {"message": message, "type": kind, "param": None, "code": reason}}


def failure_headers(failed: CallFailed) -> list[tuple[bytes, bytes]]:
    if failed.retry_after is None:
        return []
    return [
        (b"retry-after", str(max(1, math.ceil(failed.retry_after))).encode()),
        (b"retry-after-ms", str(max(1, round(failed.retry_after * 1000))).encode()),
    ]


class _CallResponse(Response):
    """Runs one call in the request's own task (so the scope's context stays in one task) and
    answers it: JSON for a unary call, server-sent events for a stream."""

    def __init__(self, front: "HttpFront", request: Request, service: str, method: str, run, streaming: bool) -> None:
        self.front = front
        self.request = request
        self.service = service
        self.method = method
        self.run = run  # async (body, scope) -> dict, or an async iterator of dicts (streaming)
        self.streaming = streaming
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        request = self.request
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        headers = [(b"x-request-id", request_id.encode())]
        started = False
        watcher = None
        call = self.front.guard.scope(
            self.service,
            self.method,
            request_id,
            authorize=self.front.authorizer(self.service, self.method, request),
            carrier=dict(request.headers) if tracing.enabled() else None,
            span_name=f"{request.method} {request.url.path}",
            log_fields={"transport": "http"},
        )
        try:
            async with call:
                body = await self.front.read_json(request)
                if not self.streaming:
                    payload = _dumps(await self.run(body, call))
                else:
                    events = self.run(body, call)
                    try:
                        item = await anext(events)  # the call's errors before any output still get a status
                        watcher = _Watcher(receive)
                        await send({"type": "http.response.start", "status": 200, "headers": headers + _SSE_HEADERS})
                        started = True
                        while item is not None:
                            await send({"type": "http.response.body", "body": b"data: " + _dumps(item) + b"\n\n", "more_body": True})
                            item = await anext(events, None)
                    finally:
                        await events.aclose()  # here, in the call's context (its stage spans end here)
            if not self.streaming:
                await send({"type": "http.response.start", "status": 200, "headers": headers + [(b"content-type", _JSON.encode())]})
                await send({"type": "http.response.body", "body": payload})
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        except CallFailed as failed:
            status, error = error_body(failed.code, failed.message, failed.reason)
            if started:  # a stream already under way: the error is its last event
                await send({"type": "http.response.body", "body": b"data: " + _dumps(error) + b"\n\ndata: [DONE]\n\n", "more_body": True})
            else:
                extra = failure_headers(failed) + [(b"content-type", _JSON.encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers + extra})
                await send({"type": "http.response.body", "body": _dumps(error)})
        except asyncio.CancelledError:
            if watcher is None or not watcher.disconnected:
                raise
            asyncio.current_task().uncancel()  # the caller left: nothing more to send
            return
        finally:
            if watcher is not None:
                watcher.stop()
        if started:  # the end of the stream, once nothing can cancel this task any more
            await send({"type": "http.response.body", "body": b""})


_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class _Watcher:
    def __init__(self, receive) -> None:
        self.disconnected = False
        self._owner = asyncio.current_task()
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._owner is not None:
            self.disconnected = True
            self._owner.cancel()  # leaving the generation cancels the Triton request

    def stop(self) -> None:
        self._task.cancel()
        self._owner = None


class HttpFront:
    def __init__(
        self,
        guard: CallGuard,
        catalog: Catalog,
        *,
        embed,
        rerank,
        generate,
        models,
        health,
        auth=None,
        max_body_bytes: int,
    ) -> None:
        self.guard = guard
        self.catalog = catalog
        self.embed, self.rerank, self.generate, self.models = embed, rerank, generate, models
        self.health = health
        self.auth = auth  # an auth.AuthInterceptor: the same keys as gRPC
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.port = 0
        errors = {404: self._not_found, 405: self._not_found}
        self.app = Starlette(
            routes=[
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/rerank", self._rerank, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
            ],
            exception_handlers=errors,
        )

    # --- serving ------------------------------------------------------------------------

    async def start(self, host: str, port: int, grace: float, reuse_port: bool = False) -> int:
        """Binds host:port (0 = any free port) and serves on this loop; returns the port.
        `reuse_port`: several gateway processes share the port (--workers)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"could not bind the HTTP port {host}:{port}: {exc}") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=max(grace, 0.1), ws="none",
        )
        self.server = _Server(config)
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the HTTP server on {host}:{self.port} stopped at start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets calls in flight finish (at most `grace` seconds)."""
        self.draining = True
        if self.server is None or self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 2)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - shutting down: log and go on
            log.warning("http_stop", error=repr(exc))
            self._task.cancel()

    # --- shared steps -------------------------------------------------------------------

    def authorizer(self, service: str, method: str, request: Request) -> Callable[[], None] | None:
        if self.auth is None:
            return None
        path = f"/ragserve.v1.{service}/{method}"
        metadata = [(k, v) for k in ("authorization", "x-api-key") if (v := request.headers.get(k)) is not None]

        def authorize() -> None:
            error = self.auth.check(path, metadata)
            if error is not None:
                raise error

        return authorize

    async def read_json(self, request: Request) -> dict:
        """The request's JSON object (read once per request; a bad body raises InvalidInput)."""
        cached = getattr(request.state, "json_body", None)
        if cached is None:
            try:
                cached = await self._read_json(request)
            except InvalidInput as exc:
                cached = exc
            request.state.json_body = cached
        if isinstance(cached, InvalidInput):
            raise cached
        return cached

    async def _read_json(self, request: Request) -> dict:
        if request.method == "GET":
            return {}
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise InvalidInput(f"request body of {length} bytes exceeds {self.max_body_bytes} (--max-message-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise InvalidInput(f"request body exceeds {self.max_body_bytes} bytes (--max-message-bytes)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidInput("request body must be a JSON object")
        return body

    def _call(self, request: Request, service: str, method: str, run, streaming: bool = False) -> _CallResponse:
        return _CallResponse(self, request, service, method, run, streaming)

    # --- routes -------------------------------------------------------------------------

    async def _embeddings(self, request: Request) -> Response:
        async def run(body, call) -> dict:
            with _shape_errors():
                embed_request, encoding = shapes.embed_request(body)
            return shapes.embed_response(await self.embed.embed(embed_request, timeout=None), encoding)

        return self._call(request, "Embed", "Embed", run)

    async def _rerank(self, request: Request) -> Response:
        async def run(body, call) -> dict:
            if self.rerank is None:
                raise ModelNotFound("no reranking model is served")
            with _shape_errors():
                rerank_request = shapes.rerank_request(body)
            return shapes.rerank_response(await self.rerank.rerank(rerank_request, timeout=None), call.request_id)

        return self._call(request, "Rerank", "Rerank", run)

    async def _models(self, request: Request) -> Response:
        async def run(body, call) -> dict:
            return shapes.models_response(await self.models.ListModels(models_pb2.ListModelsRequest(), None))

        return self._call(request, "Models", "ListModels", run)

    async def _chat(self, request: Request) -> Response:
        return await self._generation(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._generation(request, chat=False)

    async def _generation(self, request: Request, chat: bool) -> Response:
        # Whether it streams picks the method label (as over gRPC) before the call starts; a
        # body that cannot be read is answered inside the call (as Generate) all the same.
        try:
            streaming = (await self.read_json(request)).get("stream") is True
        except InvalidInput:
            streaming = False  # answered inside the call, as Generate

        def build(body) -> generate_pb2.GenerateRequest:
            if self.generate is None:
                raise ModelNotFound("no generation model is served")
            with _shape_errors():
                return shapes.chat_request(body) if chat else shapes.completion_request(body)

        async def whole(body, call) -> dict:
            final, generate_request = None, build(body)
            async for event in self.generate.generate(generate_request, timeout=None):
                if isinstance(event, generate_pb2.GenerateResponse):
                    final = event
            return shapes.Completion(chat, call.request_id, final.model).whole(final)

        async def chunks(body, call):
            generate_request = build(body)
            usage = shapes.include_usage(body)
            model = self.catalog.get(requested_model(generate_request.model), (GENERATION,)).name
            completion = shapes.Completion(chat, call.request_id, model)
            events = self.generate.generate(generate_request, timeout=None)
            first = completion.first_chunk()  # the role, before the first text (chat)
            try:
                async for event in events:
                    if isinstance(event, generate_pb2.GenerateResponse):
                        yield completion.final_chunk(event)
                        if usage:
                            yield completion.usage_chunk(event)
                    else:
                        if first is not None:
                            yield first
                            first = None
                        yield completion.delta_chunk(event)
            finally:
                await events.aclose()

        return self._call(request, "Generate", "GenerateStream" if streaming else "Generate", chunks if streaming else whole, streaming)

    async def _health(self, request: Request) -> Response:
        serving = not self.draining and self.health.serving.get("", False)
        return JSONResponse({"status": "serving" if serving else "not_serving"}, status_code=200 if serving else 503)

    async def _not_found(self, request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: " + ("no such route" if exc.status_code == 404 else "method not allowed")
        status, body = error_body(grpc.StatusCode.NOT_FOUND, message, "route_not_found")
        return JSONResponse(body, status_code=exc.status_code, headers={"x-request-id": uuid.uuid4().hex})


@contextmanager
def _shape_errors():
    """A value the protobuf message refuses (e.g. a lone surrogate in a string) is bad input."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"request could not be read: {exc}") from None


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway's main owns SIGINT/SIGTERM and stops
    this server from Gateway.stop."""

    @contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass
