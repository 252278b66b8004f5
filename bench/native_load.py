"""A load generator that is not Python: h2load (Debian's nghttp2-client) sending pre-framed gRPC calls.

Python clients cap near 1,100-1,500 calls/s a process and take cores from the server they
measure; h2load is C and costs a fraction of that. It speaks HTTP/2 only, so a gRPC unary call
is sent as what it is on the wire: a POST to /package.Service/Method with `content-type:
application/grpc`, `te: trailers` and the body framed by hand (a 0 byte: not compressed, the
message length as 4 big-endian bytes, the serialized request). h2load sees only the HTTP
status (200 for every gRPC answer, errors included), so gRPC errors are counted from the
server's own metrics (`gateway_errors`) or with a Python probe afterwards.

    from native_load import h2load
    result = h2load("127.0.0.1:50051", "/ragserve.v1.Embed/Embed", embed_pb2.EmbedRequest(inputs=["hi"]),
                    concurrency=64, seconds=10)
    result.rate, result.done, result.http_failed

`make bench` / `make profile` install h2load with apt when it is missing (`ensure_h2load`).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

H2LOAD = "h2load"


def ensure_h2load() -> str:
    """The h2load binary's path ($RAGSERVE_H2LOAD: one unpacked from carried .deb files, bench/gpu_check.sh);
    installs Debian's nghttp2-client when it is missing (root, apt)."""
    if os.environ.get("RAGSERVE_H2LOAD"):
        return os.environ["RAGSERVE_H2LOAD"]
    found = shutil.which(H2LOAD)
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], check=True, stdout=subprocess.DEVNULL)
        found = shutil.which(H2LOAD)
    if found is None:
        raise RuntimeError("h2load not found; install Debian's nghttp2-client (apt-get install -y nghttp2-client)")
    return found


def grpc_frame(message) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length, bytes."""
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


@dataclass
class Result:
    done: int  # HTTP/2 requests that completed (gRPC errors included: see gateway_errors)
    http_failed: int  # requests h2load itself counted as failed or errored
    seconds: float  # h2load's own measured duration
    client_cpu: float  # h2load's CPU seconds (user + system) for the whole run
    mean_ms: float = float("nan")  # mean time per request (h2load prints no percentiles)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


def h2load(
    address: str, path: str, request, *, concurrency: int, seconds: float, connections: int | None = None,
    warm_up: float = 1.0, threads: int = 1,
) -> Result:
    """Runs h2load against `address` (host:port, plaintext HTTP/2) for `seconds` after `warm_up`
    (whole seconds): `concurrency` calls in flight over `connections` connections (default: one
    per 16 calls), every call the same request message."""
    return start(address, path, request, concurrency=concurrency, seconds=seconds, connections=connections,
                 warm_up=warm_up, threads=threads).result()


class Run:
    """An h2load run under way: its measured window starts `warm_up` s after `started`
    (time.monotonic()) and lasts `seconds`; `result()` waits for it."""

    def __init__(self, command: list[str], body: Path, warm_up: int, seconds: int) -> None:
        self.body, self.warm_up, self.seconds = body, warm_up, seconds
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> Result:
        out = self.process.stdout.read()
        self.process.stdout.close()
        # Reaped here (not by Popen) to read its own CPU time.
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.body.unlink(missing_ok=True)
        return _parse(out, usage.ru_utime + usage.ru_stime)


def start(
    address: str, path: str, request, *, concurrency: int, seconds: float, connections: int | None = None,
    warm_up: float = 1.0, threads: int = 1, rps: float | None = None,
) -> Run:
    """Starts h2load (see `h2load`); `rps`: calls per second per connection (h2load's --rps), at
    most `concurrency` in flight: an open-loop load at a chosen rate."""
    binary = ensure_h2load()
    connections = connections or max(1, min(concurrency, (concurrency + 15) // 16))
    streams = max(1, concurrency // connections)
    fd, name = tempfile.mkstemp(prefix="grpc-body-", suffix=".bin")
    with os.fdopen(fd, "wb") as body:
        body.write(grpc_frame(request))
    warm_up, seconds = max(1, round(warm_up)), max(1, round(seconds))
    command = [
        binary, f"http://{address}{path}", "-d", name,
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-c", str(connections), "-m", str(streams), "-t", str(threads),
        "-D", str(seconds), "--warm-up-time", str(warm_up),
        *(["--rps", str(max(1, round(rps)))] if rps else []),
    ]
    return Run(command, Path(name), warm_up, seconds)


def _parse(out: str, client_cpu: float) -> Result:
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    # The rate is over the measured window (warm-up excluded), as are the counts.
    finished = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    if requests is None or finished is None:
        raise RuntimeError(f"h2load's output was not understood:\n{out[-2000:]}")
    rate = float(finished.group(1))
    seconds = int(requests.group(3)) / rate if rate else 0.0
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    mean_ms = float("nan") if mean is None else float(mean.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)]
    return Result(
        done=int(requests.group(3)), http_failed=int(requests.group(5)) + int(requests.group(6)),
        seconds=seconds, client_cpu=client_cpu, mean_ms=mean_ms,
    )


def gateway_errors(metrics_url: str) -> int:
    """Calls the gateway answered with a gRPC status other than OK, from its /metrics.
    CANCELLED is not counted: h2load closes its connections when its time is up, and the
    calls then in flight (one per stream) end CANCELLED, the caller's doing."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("ragserve_requests_total{") and 'code="OK"' not in line and 'code="CANCELLED"' not in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def write_body(request, path: Path) -> Path:
    """Writes `request` framed for h2load's -d (the GPU check carries such files)."""
    path.write_bytes(grpc_frame(request))
    return path
