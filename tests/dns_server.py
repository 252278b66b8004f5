"""A real DNS server on loopback (dnslib) whose answer for one name the test changes."""

from __future__ import annotations

import ipaddress
import socket
import threading

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import DNSLogger, DNSServer


class ChangingDns:
    """Answers the A/AAAA records of `name` from `addresses` (changed by the test), on UDP and
    TCP at the same free port of `host`. `mode`: "answer", "servfail" (every question gets
    SERVFAIL) or "truncate" (UDP answers carry only the TC bit: the client must ask over TCP).
    `questions` counts the questions about `name`, by protocol ("udp"/"tcp")."""

    def __init__(self, name: str, addresses: list[str], host: str = "127.0.0.1") -> None:
        self.name = name.rstrip(".") + "."
        self.addresses = list(addresses)
        self.mode = "answer"
        self.questions = {"udp": 0, "tcp": 0}
        self._lock = threading.Lock()
        self.port = _free_udp_and_tcp_port(host)
        quiet = DNSLogger(logf=lambda _: None)
        self._servers = [DNSServer(self, address=host, port=self.port, tcp=tcp, logger=quiet) for tcp in (False, True)]
        for server in self._servers:
            server.start_thread()
        self.host = host
        self.running = True

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def answer(self, addresses: list[str], mode: str = "answer") -> None:
        with self._lock:
            self.addresses, self.mode = list(addresses), mode

    def resolve(self, request, handler):  # dnslib's resolver interface
        reply = request.reply()
        qname, qtype = str(request.q.qname), QTYPE[request.q.qtype]
        with self._lock:
            addresses, mode = list(self.addresses), self.mode
            if qname.lower() == self.name.lower():
                self.questions[handler.protocol] += 1
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if qname.lower() != self.name.lower():
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if mode == "truncate" and handler.protocol == "udp":
            reply.header.tc = 1
            return reply
        for address in addresses:
            version = ipaddress.ip_address(address).version
            if (qtype, version) == ("A", 4):
                reply.add_answer(RR(self.name, QTYPE.A, rdata=A(address), ttl=0))
            elif (qtype, version) == ("AAAA", 6):
                reply.add_answer(RR(self.name, QTYPE.AAAA, rdata=AAAA(address), ttl=0))
        return reply

    def stop(self) -> None:
        """Stops and closes both sockets: questions then get no answer (ICMP port unreachable)."""
        if not self.running:
            return
        self.running = False
        for server in self._servers:
            server.stop()
            server.server.server_close()


def _free_udp_and_tcp_port(host: str) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")
