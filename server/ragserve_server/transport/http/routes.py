"""The HTTP front's routes: OpenAI- and Cohere-compatible, over the gRPC services' own methods.

    POST /v1/embeddings        OpenAI embeddings (input, model, dimensions, encoding_format float|base64)
    POST /v1/chat/completions  OpenAI chat completions (stream: true -> server-sent events, then [DONE])
    POST /v1/completions       OpenAI completions (same)
    POST /v1/rerank            Cohere / Jina rerank (query, documents, top_n, return_documents)
    GET  /v1/models            the served models
    GET  /health               200 while the gateway serves, 503 otherwise (no key needed)

Each route builds the ragserve.v1 request (openai_shapes.py) and calls the same service as the
gRPC handler (Embed's `dense`, which returns numpy vectors this front renders itself; /v1/models
reads the catalog), inside the same CallGuard scope (streaming.py says in which order the key,
the body and the permit are taken). Metrics carry the gRPC labels of the method a route calls
(`service="Embed", method="Embed"`; chat and completions are `Generate/Generate`, or
`Generate/GenerateStream` with `stream: true`), so dashboards cover both transports; the access
log line adds `transport="http"`. Every response carries `x-request-id` (the caller's, when it
sent a plain one). A call's deadline is the caller's `x-request-timeout` header, in seconds
(streaming.py: the services get the time left; spent, it answers 504); without it a call has
none, and a client that gives up disconnects (a stream is cancelled then, in the engine too).
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ragserve.v1 import generate_pb2
from ragserve_server.calls.call_scope import CallGuard
from ragserve_server.errors import InvalidInput, ModelNotFound
from ragserve_server.models.catalog import GENERATION, Catalog
from ragserve_server.observability import request_record
from ragserve_server.services.common import requested_model
from ragserve_server.transport import openai_shapes as shapes
from ragserve_server.transport.http.streaming import BodyLimits, CallResponse, error_body


class HttpFront:
    """The routes as a Starlette app (`.app`); transport/http/server.py serves it."""

    def __init__(
        self,
        guard: CallGuard,
        catalog: Catalog,
        *,
        embed,
        rerank,
        generate,
        health,
        max_body_bytes: int,
        receive_timeout: float = 10.0,
    ) -> None:
        self.guard = guard
        self.catalog = catalog
        self.embed, self.rerank, self.generate = embed, rerank, generate
        self.health = health
        self.limits = BodyLimits(max_body_bytes, receive_timeout)
        self.draining = False
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

    def _call(self, request: Request, service: str, method: str, run) -> CallResponse:
        return CallResponse(self.guard, self.limits, request, service, lambda body: (method, False), run)

    async def _embeddings(self, request: Request) -> Response:
        async def run(body, call, deadline) -> dict:
            with _shape_errors():
                embed_request, encoding = shapes.embed_request(body)
            result = await self.embed.dense(embed_request, timeout=deadline.time_left())
            with request_record.stage("respond"):  # the same stage (and span) as the gRPC answer's
                return shapes.embed_response(result, encoding)

        return self._call(request, "Embed", "Embed", run)

    async def _rerank(self, request: Request) -> Response:
        async def run(body, call, deadline) -> dict:
            if self.rerank is None:
                raise ModelNotFound("no reranking model is served")
            with _shape_errors():
                rerank_request = shapes.rerank_request(body)
            return shapes.rerank_response(await self.rerank.rerank(rerank_request, timeout=deadline.time_left()), call.request_id)

        return self._call(request, "Rerank", "Rerank", run)

    async def _models(self, request: Request) -> Response:
        async def run(body, call, deadline) -> dict:
            return shapes.models_response(self.catalog)

        return self._call(request, "Models", "ListModels", run)

    async def _chat(self, request: Request) -> Response:
        return self._generation(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return self._generation(request, chat=False)

    def _generation(self, request: Request, chat: bool) -> Response:
        def build(body) -> generate_pb2.GenerateRequest:
            if self.generate is None:
                raise ModelNotFound("no generation model is served")
            with _shape_errors():
                return shapes.chat_request(body) if chat else shapes.completion_request(body)

        async def whole(body, call, deadline) -> dict:
            final, generate_request = None, build(body)
            async for event in self.generate.generate(generate_request, timeout=deadline.time_left()):
                if isinstance(event, generate_pb2.GenerateResponse):
                    final = event
            return shapes.Completion(chat, call.request_id, final.model).whole(final)

        async def chunks(body, call, deadline):
            generate_request = build(body)
            usage = shapes.include_usage(body)
            model = self.catalog.get(requested_model(generate_request.model), (GENERATION,)).name
            completion = shapes.Completion(chat, call.request_id, model)
            events = self.generate.generate(generate_request, timeout=deadline.time_left())
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

        def method_of(body: dict) -> tuple[str, bool]:
            # Whether it streams picks the method label (as over gRPC); a body that could not
            # be read is answered as Generate.
            streaming = body.get("stream") is True
            return ("GenerateStream", True) if streaming else ("Generate", False)

        def run(body, call, deadline):
            return chunks(body, call, deadline) if body.get("stream") is True else whole(body, call, deadline)

        return CallResponse(self.guard, self.limits, request, "Generate", method_of, run)

    async def _health(self, request: Request) -> Response:
        serving = not self.draining and self.health.serving.get("", False)
        return JSONResponse({"status": "serving" if serving else "not_serving"}, status_code=200 if serving else 503)

    async def _not_found(self, request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: " + ("no such route" if exc.status_code == 404 else "method not allowed")
        status, body = error_body(grpc.StatusCode.NOT_FOUND, message, "route_not_found")
        return JSONResponse(body, status_code=exc.status_code, headers={"x-request-id": uuid.uuid4().hex})


@contextmanager
def _shape_errors():
    """A value the protobuf message refuses (e.g. a lone surrogate in a string) is bad input;
    so is one nested too deeply for it."""
    try:
        yield
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"request could not be read: {exc}") from None
