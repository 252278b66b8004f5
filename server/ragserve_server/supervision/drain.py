"""Draining before the gRPC server's GOAWAY: the calls in flight finish and their answers leave.

Why: `grpc.aio.Server.stop(grace)` sends GOAWAY, and gRPC core closes a connection (shutdown
both ways, then close) as soon as its last call's answer is handed to the kernel, not once the
caller has received it. A caller still reading a large answer (a client starved of CPU whose
receive window is full) keeps sending HTTP/2 frames (WINDOW_UPDATE, PING acks) on that
connection; Linux answers data arriving on a closed socket with a RST and drops the answer's
bytes not yet sent (`TcpExtTCPAbortOnData`): the caller's call fails with `recvmsg: Connection
reset by peer` although the gateway finished it. So the gateway first waits, before GOAWAY,
until no call is in flight and the kernel holds no unacknowledged byte on the port's
connections (the peers' kernels have every answer), over a few consecutive looks; only then is
the server stopped. New calls are still taken meanwhile (health already says NOT_SERVING, which
balancers act on), so the wait is bounded: at most `share` of the grace period, the rest being
the server's own grace for the calls still running then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("ragserve")

SETTLE_SHARE = 0.5  # of the grace period, at most, before GOAWAY; the rest is the server's grace
_ESTABLISHED = "01"
_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def unacknowledged_bytes(port: int) -> int | None:
    """Bytes the kernel still holds for peers (sent but not acknowledged, or not sent yet) on
    the established connections whose local port is `port`; None where /proc/net/tcp is not
    there (not Linux): then only the calls are waited for."""
    total, found = 0, False
    for table in _TCP_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx_queue:rx_queue ...
            if len(fields) < 5 or fields[3] != _ESTABLISHED:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":", 1)[0], 16)
    return total if found else None


def total(gauge) -> float:
    """The sum of a Prometheus gauge's samples (e.g. calls in flight over every service)."""
    return sum(sample.value for family in gauge.collect() for sample in family.samples)


async def settle(port: int, in_flight: Callable[[], float], budget: float, *, interval: float = 0.05, looks: int = 4) -> bool:
    """Waits until no call is in flight and no byte is left unacknowledged on `port`, seen on
    `looks` polls in a row (an answer may still be on its way from a handler to the socket
    between two looks), for at most `budget` seconds. True when settled."""
    if budget <= 0:  # no grace: nothing is waited for
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    quiet, told = 0, False
    while True:
        queued = unacknowledged_bytes(port)
        calls = in_flight()
        quiet = quiet + 1 if calls <= 0 and not queued else 0
        if calls <= 0 and queued and not told:  # answers written, not yet taken by their callers
            log.info("drain_waiting_for_delivery", unacknowledged_bytes=queued)
            told = True
        if quiet >= looks:
            return True
        if loop.time() >= deadline:
            log.warning("drain_unsettled", calls_in_flight=calls, unacknowledged_bytes=queued, waited_s=round(budget, 3))
            return False
        await asyncio.sleep(interval)
