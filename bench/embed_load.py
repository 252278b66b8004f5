"""A bounded single-sentence Embed load, in its own process (bench/profile_embed.py counts its CPU apart).

    python bench/embed_load.py ADDRESS CONCURRENCY SECONDS

Runs CONCURRENCY callers, one call in flight each, for SECONDS, then prints the
time.monotonic() of every completed call as JSON (the caller counts the calls in its window).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from ragserve.v1 import embed_pb2, embed_pb2_grpc

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from embed_bench import sentences  # noqa: E402


async def run(address: str, concurrency: int, seconds: float) -> list[float]:
    texts = sentences(3000)
    done: list[float] = []
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)

        async def caller(offset: int) -> None:
            i = offset
            while time.monotonic() < end:
                await stub.Embed(embed_pb2.EmbedRequest(inputs=[texts[i % len(texts)]]), timeout=30)
                done.append(time.monotonic())
                i += concurrency

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))))
