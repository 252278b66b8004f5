"""The keys file parser, the key helper CLI and `--reflection off`, in-process (no Triton, no
gateway process: so not `integration`). The real-gateway security tests are in test_security_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc


def test_keys_file_problems_name_the_line_not_the_key():
    from ragserve_server.security.auth import KEYED_SERVICES, presented_key
    from ragserve_server.security.keys import KeysFileError, digest, key_line, parse_keys

    good = key_line("a", "rs_secret-one", ["ragserve.v1.Embed"])
    assert parse_keys(f"# comment\n\n{good}\n", known_services=KEYED_SERVICES)[digest("rs_secret-one")].may_call("ragserve.v1.Embed")
    for text, message in (
        ('{"name": "a"}', "line 1: 'sha256'"),
        (f"{good}\n{good}", "line 2: name 'a' is used twice"),
        ("rs_secret-two", "line 1: not a JSON object"),
        (key_line("b", "rs_secret-three", ["ragserve.v1.embed"]), "unknown services ['ragserve.v1.embed']"),
        ('{"name": "c", "sha256": "' + "0" * 64 + '", "extra": 1}', "unknown fields ['extra']"),
    ):
        with pytest.raises(KeysFileError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
            parse_keys(text, known_services=KEYED_SERVICES)
        assert "rs_secret" not in str(error.value)
    assert presented_key([("authorization", "Bearer  rs_k1 ")]) == "rs_k1"
    assert presented_key([("x-api-key", "rs_k2"), ("authorization", "bearer rs_k3")]) == "rs_k3"
    assert presented_key([("authorization", "Basic abc")]) is None


def test_key_helper_hashes_an_existing_key():
    out = subprocess.run(
        [sys.executable, "-m", "ragserve_server.security.keys", "hash", "--name", "old", "--services", "ragserve.v1.Rerank"],
        input="rs_an-existing-key\n", capture_output=True, text=True, check=True,
    )
    from ragserve_server.security.keys import digest

    assert json.loads(out.stdout) == {"name": "old", "sha256": digest("rs_an-existing-key"), "services": ["ragserve.v1.Rerank"]}
    refused = subprocess.run(
        [sys.executable, "-m", "ragserve_server.security.keys", "new", "--name", "x", "--services", "Embed"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "unknown services" in refused.stderr


async def test_reflection_off_answers_unimplemented():
    from grpc_reflection.v1alpha import reflection

    from ragserve_server.security.auth import Authenticator
    from ragserve_server.transport.grpc_methods import GatewayMethods

    server = grpc.aio.server()
    methods = GatewayMethods(guard=None, auth=Authenticator.from_settings("", "off"))  # reflection needs no guard
    methods.add_reflection([reflection.SERVICE_NAME])
    methods.install(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # No request iterator: the server refuses before reading any message, and a client
            # write racing that refusal fails on the client's side with INTERNAL ("Failed
            # execute_batch"), which would be gRPC's doing, not the server's answer.
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            with pytest.raises(grpc.RpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
    with pytest.raises(ValueError, match="needs --api-keys-file"):
        Authenticator.from_settings("", "keyed")
