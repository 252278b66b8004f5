"""The gateway's gRPC methods wrapped once at start-up (transport/grpc_methods.py), in-process
with the fake backend: the key is checked before the request bytes are parsed, request ids
come back on unary calls and streams, reflection stays behind --reflection and health open,
and a service that the wrappers cannot see is refused at start-up instead of served unguarded."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ragserve.v1 import embed_pb2, embed_pb2_grpc
from ragserve_server.app import create_gateway
from ragserve_server.calls.admission import Admission
from ragserve_server.calls.call_scope import CallGuard
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.models.catalog import build_catalog
from ragserve_server.security.keys import key_line
from ragserve_server.settings import Settings
from ragserve_server.transport.grpc_methods import GatewayMethods

from fakes import FakeBackend

EMBED = "/ragserve.v1.Embed/Embed"
KEY = [("x-api-key", "rs_methods")]
# A field-1 string (EmbedRequest.inputs) that is not UTF-8: protobuf refuses to parse it.
NOT_UTF8 = b"\x0a\x02\xff\xfe"


async def _gateway(tmp_path, **settings):
    keys = tmp_path / "keys.jsonl"
    keys.write_text(key_line("methods", "rs_methods", ["ragserve.v1.Embed"]) + "\n")
    return await create_gateway(
        Settings(port=0, api_keys_file=str(keys), health_poll_interval=0.05, **settings), FakeBackend(), build_catalog([minilm_spec()])
    )


def _raw_embed(channel: grpc.aio.Channel):
    return channel.unary_unary(EMBED, request_serializer=None, response_deserializer=embed_pb2.EmbedResponse.FromString)


async def test_the_key_is_checked_before_the_request_is_parsed(tmp_path):
    gateway = await _gateway(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            embed = _raw_embed(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await embed(NOT_UTF8)  # no key: refused without looking at the bytes
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await embed(NOT_UTF8, metadata=KEY)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be parsed" in invalid.value.details()
            call = embed(embed_pb2.EmbedRequest(inputs=["hello"]).SerializeToString(), metadata=[*KEY, ("x-request-id", "req-1")])
            assert len((await call).embeddings) == 1
            assert ("x-request-id", "req-1") in tuple(await call.trailing_metadata())
            # An id that is not a short plain token is replaced, on refusals too.
            with pytest.raises(grpc.aio.AioRpcError) as replaced:
                await embed(NOT_UTF8, metadata=[("x-request-id", "bad id\u00e9".encode().hex() + " x")])
            ids = [v for k, v in replaced.value.trailing_metadata() if k == "x-request-id"]
            assert len(ids) == 1 and len(ids[0]) == 32
    finally:
        await gateway.stop(0)


async def test_a_stream_sends_its_request_id_first_and_refuses_bad_messages(tmp_path):
    gateway = await _gateway(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stream = channel.stream_stream(
                "/ragserve.v1.Embed/EmbedStream", request_serializer=None, response_deserializer=embed_pb2.EmbedStreamResponse.FromString
            )
            ok = embed_pb2.EmbedStreamRequest(id="a", request=embed_pb2.EmbedRequest(inputs=["hi"])).SerializeToString()
            call = stream(iter([ok, b"\x12\x02\x0a\xff"]), metadata=[*KEY, ("x-request-id", "stream-1")])
            assert ("x-request-id", "stream-1") in tuple(await call.initial_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                async for _ in call:
                    pass
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await gateway.stop(0)


async def _list_services(channel, metadata=()):
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata
    )
    async for response in call:
        return [s.name for s in response.list_services_response.service]


@pytest.mark.parametrize("mode", ["keyed", "off", "open"])
async def test_reflection_follows_its_setting_and_health_stays_open(tmp_path, mode):
    gateway = await _gateway(tmp_path, reflection=mode)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
            if mode == "open":
                assert "ragserve.v1.Embed" in await _list_services(channel)
                return
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _list_services(channel)
            assert refused.value.code() == (grpc.StatusCode.UNAUTHENTICATED if mode == "keyed" else grpc.StatusCode.UNIMPLEMENTED)
            if mode == "keyed":
                assert "ragserve.v1.Embed" in await _list_services(channel, KEY)
            else:
                with pytest.raises(grpc.aio.AioRpcError) as off:
                    await _list_services(channel, KEY)
                assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await gateway.stop(0)


def test_a_service_the_wrappers_cannot_see_is_refused():
    methods = GatewayMethods(CallGuard(Admission(4, 4)))
    embed_pb2_grpc.add_EmbedServicer_to_server(embed_pb2_grpc.EmbedServicer(), methods)
    assert set(methods.handlers) == {"/ragserve.v1.Embed/Embed", "/ragserve.v1.Embed/EmbedStream"}
    # Generated code of another grpcio-tools that registers only a generic handler.
    methods.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("other.v1.Thing", {}),))
    server = grpc.aio.server()
    with pytest.raises(RuntimeError, match="other.v1.Thing"):
        methods.install(server)
