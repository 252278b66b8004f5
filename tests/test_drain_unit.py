"""supervision/drain.py on real loopback sockets (no gateway): the drain waits for the calls in
flight and for every byte of the answers to reach the peers' kernels before GOAWAY."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from ragserve_server.supervision import drain

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/tcp is Linux's")


def _pair_with_a_stuck_answer():
    """(listener, server side, client side): the server side has bytes the client has not
    taken (its receive buffer is full: a caller starved of CPU)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.setblocking(False)
    try:
        while True:
            server.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return listener, server, client


async def test_settle_waits_for_unacknowledged_bytes_then_for_calls():
    listener, server, client = _pair_with_a_stuck_answer()
    port = listener.getsockname()[1]
    try:
        assert drain.unacknowledged_bytes(port) > 0
        # An answer still in the gateway's kernel: not settled, whatever the calls say.
        assert await drain.settle(port, lambda: 0, 0.3) is False
        # The caller reads it all (in a thread, as a client would): settled.
        reader = asyncio.create_task(asyncio.to_thread(_read_all, client))
        await asyncio.sleep(0)
        server.shutdown(socket.SHUT_WR)
        assert await drain.settle(port, lambda: 0, 30) is True
        await reader
        # A call in flight keeps it unsettled too; none in flight and nothing queued settles.
        assert await drain.settle(port, lambda: 1, 0.3) is False
        assert await drain.settle(port, lambda: 0, 0) is False  # no grace: no wait
    finally:
        for s in (server, client, listener):
            s.close()


def _read_all(sock: socket.socket) -> None:
    while sock.recv(1 << 16):
        pass


def test_gauge_total_sums_every_service():
    from prometheus_client import CollectorRegistry, Gauge

    gauge = Gauge("in_flight", "x", ["service"], registry=CollectorRegistry())
    gauge.labels("Embed").inc(2)
    gauge.labels("Generate").inc()
    assert drain.total(gauge) == 3
