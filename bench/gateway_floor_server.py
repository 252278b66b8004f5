"""The gateway's own floor for bench/latency_ladder.py: ragserve's gateway, as deployed, in front
of the tests' fake backend (tests/fakes.py: answers at once, no Triton, no model).

Its latency at concurrency 1 is what the gateway itself (interceptor, admission, tokenizing,
request and response building, logging and metrics) adds to loopback gRPC; set beside
bench/echo_server.py (a grpc.aio server that does nothing), the difference is ragserve's part.

    .venv/bin/python bench/gateway_floor_server.py --port 50123
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fakes import FakeBackend  # noqa: E402
from ragserve_server.app import create_gateway  # noqa: E402
from ragserve_server.models.catalog import build_catalog  # noqa: E402
from ragserve_server.observability.logging_setup import configure_logging  # noqa: E402
from ragserve_server.models.builtin import minilm_spec  # noqa: E402
from ragserve_server.settings import Settings  # noqa: E402


class _Discard(list):
    """The fake's request log, kept empty: a long run would otherwise hold every input."""

    def append(self, item) -> None:
        pass


async def serve(port: int) -> None:
    settings = Settings(port=port, http_port=0)
    # As main.py does: JSON lines (structlog's default console renderer costs several times more).
    configure_logging(settings.log_format, settings.log_level)
    backend = FakeBackend()
    backend.requests = backend.timeouts = backend.lanes = _Discard()
    gateway = await create_gateway(settings, backend, build_catalog([minilm_spec()]))
    await gateway.server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))
