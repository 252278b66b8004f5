"""The HTTP front's socket lifecycle: uvicorn on the gateway's own event loop, TLS, limits.

    server = HttpServer(front.app, tls=security.tls.https_context(cert, key, client_ca), ...)
    port = await server.start(host, port, grace)      # 0 = any free port
    await server.stop(grace)                          # stops accepting, lets calls finish

TLS: the same certificate, key and client CA as gRPC (--tls-*), re-read on change without a
restart (security/tls.py), client certificates required when --tls-client-ca is set.

Limits, so that idle or slow connections cannot pile up: at most `max_connections` open
connections (uvicorn's `limit_concurrency`: beyond it a request is answered 503 and the
connection closed), an idle keep-alive connection closed after `keep_alive` seconds
(uvicorn's `timeout_keep_alive`), request headers bounded in size (h11's incomplete-event
limit) and in time: uvicorn has no deadline for a request's headers, so `_DeadlineH11`
closes a connection whose next request's headers have not all arrived `receive_timeout`
seconds after its first byte (or after the connection opened). The body's own deadline is
in streaming.py, where the body is read.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from contextlib import contextmanager

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger("ragserve.http")

MAX_HEADER_BYTES = 32 * 1024


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    receive_timeout = 10.0  # set per server (a subclass per HttpServer)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.receive_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self._header_timer is None:  # the first byte of a next request
            self._header_timer = self.loop.call_later(self.receive_timeout, self._headers_too_slow)
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not None and not self.cycle.response_complete:
            self._header_timer.cancel()  # the headers are in: the body's deadline is streaming.py's
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    def __init__(
        self,
        app,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 1024,
        keep_alive: float = 5.0,
        receive_timeout: float = 10.0,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.tls = tls
        self.max_connections = max_connections
        self.keep_alive = keep_alive
        self.receive_timeout = receive_timeout
        self.on_drain = on_drain or (lambda: None)
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.port = 0

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
        protocol = type("DeadlineH11", (_DeadlineH11,), {"receive_timeout": self.receive_timeout})
        tls = self.tls
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=max(grace, 0.1), ws="none", http=protocol,
            limit_concurrency=self.max_connections, timeout_keep_alive=self.keep_alive,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            ssl_context_factory=(lambda config, default: tls) if tls is not None else None,
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
        self.on_drain()
        if self.server is None or self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 2)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - shutting down: log and go on
            log.warning("http_stop", error=repr(exc))
            self._task.cancel()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway's main owns SIGINT/SIGTERM and stops
    this server from Gateway.stop."""

    @contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass
