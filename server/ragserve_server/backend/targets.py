"""`--triton-url`: a list of Triton addresses, or one DNS name re-resolved on every refresh.

Forms (the DNS ones follow gRPC's naming, `dns:[//authority/]host[:port]`, with the port
required since Triton's gRPC port has no default here):

- `host:port[,host:port...]`: a fixed set of replicas.
- `dns:///name:port` (or `dns:name:port`): `name` through the system resolver
  (getaddrinfo: /etc/hosts, search domains, the cluster DNS of a Kubernetes pod).
- `dns://DNS_SERVER_IP[:port]/name:port`: the A and AAAA records of `name`, asked of that
  DNS server directly over UDP (TCP when the answer is truncated), port 53 by default. The
  name is sent as given (no search domains): write it fully qualified.

A lookup that fails (timeout, SERVFAIL, no record at all) raises `DnsLookupFailed`; the
replica set then keeps the replicas it had.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSError, DNSRecord

DNS_TIMEOUT = 2.0  # seconds for one question to a DNS server (A and AAAA are asked side by side)
EXAMPLES = "e.g. 10.0.0.5:8001, dns:///triton-headless:8001 or dns://10.96.0.10:53/triton-headless.ns.svc.cluster.local:8001"


class DnsLookupFailed(OSError):
    """The name could not be resolved now (the caller keeps what it had)."""


@dataclass(frozen=True)
class DnsTarget:
    host: str
    port: int
    server: tuple[str, int] | None = None  # the DNS server asked directly; None: the system resolver

    def __str__(self) -> str:
        if self.server is None:
            return f"dns:///{self.host}:{self.port}"
        return f"dns://{join_host_port(*self.server)}/{self.host}:{self.port}"


def parse_targets(value: str) -> tuple[list[str], DnsTarget | None]:
    """`--triton-url` -> (static host:port list, or [] and a DNS target).

    Raises ValueError with a message for a person on a bad address or duplicates.
    """
    value = value.strip()
    if value.startswith("dns:"):
        return [], parse_dns(value)
    addresses = [a.strip() for a in value.split(",") if a.strip()]
    if not addresses:
        raise ValueError(f"--triton-url: no Triton address given ({EXAMPLES})")
    seen = set()
    for address in addresses:
        host, port = split_host_port(address, address)
        key = f"{host}:{port}"
        if key in seen:
            raise ValueError(f"--triton-url: replica {address!r} is given twice")
        seen.add(key)
    return addresses, None


def parse_dns(value: str) -> DnsTarget:
    rest = value[len("dns:"):]
    server = None
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if not slash:
            raise ValueError(f"--triton-url: {value!r}: a DNS target is dns:///name:port or dns://DNS_SERVER_IP[:port]/name:port")
        if authority:
            server = _dns_server(authority, value)
    if "/" in rest:
        raise ValueError(f"--triton-url: {value!r}: a DNS target is dns:///name:port or dns://DNS_SERVER_IP[:port]/name:port")
    if "," in rest:
        raise ValueError(f"--triton-url: {value!r}: one DNS name only (it resolves to every replica); a list is host:port,host:port")
    host, port = split_host_port(rest, value)
    return DnsTarget(host, port, server)


def _dns_server(authority: str, shown: str) -> tuple[str, int]:
    """`IP`, `IP:port`, `[IPv6]` or `[IPv6]:port` -> (IP, port); port 53 by default."""
    if authority.startswith("["):
        address, bracket, tail = authority[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else (None if bracket and not tail else "x")
    elif authority.count(":") == 1:
        address, port = authority.split(":")
    else:
        address, port = authority, None  # a bare IPv4 address (or an unbracketed IPv6 one)
    try:
        ip = ipaddress.ip_address(address)
        number = 53 if port is None else int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--triton-url: {shown!r}: the DNS server {authority!r} must be an IP address with an optional port "
            f"(dns://10.96.0.10:53/name:port, dns://[fd00::a]:53/name:port); dns:///name:port uses the system resolver"
        ) from None
    return str(ip), number


def split_host_port(address: str, shown: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--triton-url: {shown!r} is not host:port ({EXAMPLES})")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(target: DnsTarget, timeout: float = DNS_TIMEOUT) -> list[str]:
    """The replicas' `host:port` addresses the name stands for now; DnsLookupFailed if none."""
    if target.server is None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DnsLookupFailed(f"{target}: {exc}") from None
        ips = [sockaddr[0] for _, _, _, _, sockaddr in infos]
    else:
        answers = await asyncio.gather(*(_ask(target, qtype, timeout) for qtype in ("A", "AAAA")))
        ips = [ip for answer in answers for ip in answer]
        if not ips:
            raise DnsLookupFailed(f"{target}: no A or AAAA record for {target.host!r}")
    return list(dict.fromkeys(join_host_port(ip, target.port) for ip in ips))


async def _ask(target: DnsTarget, qtype: str, timeout: float) -> list[str]:
    """The addresses of one question to the target's DNS server; [] for NXDOMAIN or no data."""
    query = DNSRecord.question(target.host, qtype)
    try:
        reply = DNSRecord.parse(await _within(_udp(query, target.server), timeout))
        if reply.header.tc:  # truncated: the whole answer over TCP
            reply = DNSRecord.parse(await _within(_tcp(query, target.server), timeout))
    except (OSError, asyncio.TimeoutError, DNSError, struct.error, asyncio.IncompleteReadError) as exc:
        raise DnsLookupFailed(f"{target}: {qtype} question: {type(exc).__name__} {exc}".rstrip()) from None
    if reply.header.rcode == RCODE.NXDOMAIN:
        return []
    if reply.header.rcode != RCODE.NOERROR:
        raise DnsLookupFailed(f"{target}: {qtype} question answered {RCODE.get(reply.header.rcode)}")
    wanted = getattr(QTYPE, qtype)
    return [str(ipaddress.ip_address(str(rr.rdata))) for rr in reply.rr if rr.rtype == wanted]


async def _within(coro, timeout: float):
    """`asyncio.wait_for` without its race in Python <= 3.11: a cancellation that arrives as the
    inner call ends (here: a DNS server refusing at once) is swallowed, and the replica set's
    refresh loop would then never stop (seen: `ReplicaSet.close()` hung)."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read even when we leave early
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()  # timed out, or we were cancelled: the call's own cleanup runs
    if not done:
        raise asyncio.TimeoutError(f"no answer within {timeout:g} s")
    return task.result()


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes, answer: asyncio.Future) -> None:
        self.query_id, self.answer = query_id, answer

    def datagram_received(self, data: bytes, addr) -> None:
        if data[:2] == self.query_id and not self.answer.done():  # another id: a stray, late reply
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable: no server there
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp(query: DNSRecord, server: tuple[str, int]) -> bytes:
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    packet = query.pack()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Reply(packet[:2], answer), remote_addr=server)
    try:
        transport.sendto(packet)
        return await answer
    finally:
        transport.close()


async def _tcp(query: DNSRecord, server: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*server)
    try:
        packet = query.pack()
        writer.write(struct.pack("!H", len(packet)) + packet)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()
