"""The gRPC floor for bench/embed_bench.py: a grpc.aio Embed server that computes nothing.

It answers every call with a fixed unit vector per input, so its latency and throughput are
what the load generator, loopback gRPC and one asyncio server cost on this machine, with no
model: the part of ragserve's time that no change to ragserve can remove.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc

VECTOR = (np.ones(384, dtype=np.float32) / np.sqrt(384)).tolist()


class EchoEmbed(embed_pb2_grpc.EmbedServicer):
    async def Embed(self, request, context):
        response = embed_pb2.EmbedResponse(model="echo", usage=common_pb2.Usage(prompt_tokens=0, total_tokens=0))
        for _ in request.inputs:
            response.embeddings.add(values=VECTOR)
        return response


async def serve(port: int) -> None:
    server = grpc.aio.server()
    embed_pb2_grpc.add_EmbedServicer_to_server(EchoEmbed(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio", help="asyncio: a bare grpc.aio server as shipped")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=__import__("uvloop").new_event_loop if args.event_loop == "uvloop" else None) as runner:
        runner.run(serve(args.port))
