"""Shared fixtures: one real Triton and one real gateway process for the integration tests."""

from __future__ import annotations

import pytest

from support import GatewayProcess, start_triton


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    server = start_triton(tmp_path_factory.mktemp("triton"), ["minilm"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory):
    process = GatewayProcess(triton.grpc_url, triton.models, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        process.wait_serving()
    except BaseException:
        process.stop()
        print(process.log_path.read_text()[-4000:])
        raise
    yield process
    process.stop()
