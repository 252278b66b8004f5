#!/usr/bin/env python
"""End-to-end check of the Triton ``smollm2`` model (decoupled, in-flight batching).

Against a running Triton (gRPC + metrics ports), over ``tritonclient.grpc.aio``
``stream_infer``, one stream per request:
  1. a greedy chat answer, streamed token by token;
  2. the same prompt again while other requests decode: identical tokens;
  3. error contract: INVALID_ARGUMENT for prompt + max_tokens > context;
  4. cancellation: a long request is cancelled after a few tokens, the engine's running
     gauge drops back to 0 at once;
  5. the ragserve_engine_* metrics on the metrics port;
  6. throughput at 1/4/16 concurrent greedy streams (64 tokens each).

Usage: .venv/bin/python scripts/try_smollm2_triton.py [--grpc 127.0.0.1:18101]
       [--metrics http://127.0.0.1:18102/metrics]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tokenizers import Tokenizer

HF_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1" / "hf"
MODEL = "smollm2"


def chat_ids(tok: Tokenizer, question: str) -> list[int]:
    # SmolLM2-Instruct's chat template (default system prompt), written out so this
    # script only needs `tokenizers`.
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\n" + question +
            "<|im_end|>\n<|im_start|>assistant\n")
    return tok.encode(text, add_special_tokens=False).ids


def request(ids, max_tokens, **params):
    def tensor(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    inputs = [tensor("input_ids", np.array(ids, dtype=np.int64), "INT64"),
              tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32")]
    kinds = {"temperature": (np.float32, "FP32"), "top_p": (np.float32, "FP32"),
             "top_k": (np.int32, "INT32"), "repetition_penalty": (np.float32, "FP32"),
             "seed": (np.int64, "INT64")}
    for name, value in params.items():
        np_type, triton_type = kinds[name]
        inputs.append(tensor(name, np.array([value], dtype=np_type), triton_type))
    return {"model_name": MODEL, "inputs": inputs,
            "outputs": [grpcclient.InferRequestedOutput("token_id"),
                        grpcclient.InferRequestedOutput("finish_reason")]}


async def generate(client, ids, max_tokens, cancel_after=None, on_first=None,
                   **params):
    """Stream one request; returns (tokens, finish_reason or error string)."""
    done = asyncio.Event()

    async def requests():
        yield request(ids, max_tokens, **params)
        await done.wait()  # keep the stream open until the final response

    call = client.stream_infer(requests())
    tokens: list[int] = []
    try:
        async for result, error in call:
            if error is not None:
                return tokens, f"error: {error.message()}"
            tokens.append(int(result.as_numpy("token_id")[0]))
            if on_first is not None and len(tokens) == 3:  # gauges are set after a step
                on_first()
            reason = result.as_numpy("finish_reason")
            if reason is not None:
                return tokens, reason[0].decode()
            if cancel_after is not None and len(tokens) >= cancel_after:
                call.cancel()
                return tokens, "cancelled by client"
    finally:
        done.set()
    return tokens, "stream ended"


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^(ragserve_engine_\w+)\{[^}]*model="smollm2"[^}]*\} (\S+)$', text, re.M)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc", default="127.0.0.1:18101")
    ap.add_argument("--metrics", default="http://127.0.0.1:18102/metrics")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()

    tok = Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    client = grpcclient.InferenceServerClient(args.grpc)
    ok = True

    q = chat_ids(tok, "What is the capital of France?")
    t0 = time.perf_counter()
    alone, reason = await generate(client, q, 32, temperature=0.0)
    print(f"1. alone: {tok.decode(alone)!r} finish={reason} ({len(alone)} tokens, "
          f"{time.perf_counter() - t0:.2f}s)")

    others = [chat_ids(tok, t) for t in ("Write a poem about autumn.",
                                         "Explain photosynthesis.", "Tell me a joke.")]
    results = await asyncio.gather(generate(client, q, 32, temperature=0.0),
                                   *(generate(client, o, 40, temperature=0.0) for o in others))
    same = results[0][0] == alone
    ok &= same
    print(f"2. batched with 3 others: identical={same}; others finish="
          f"{[r[1] for r in results[1:]]}")

    _, err = await generate(client, q, 4000, temperature=0.0)
    bad = err.startswith("error: INVALID_ARGUMENT:")
    ok &= bad
    print(f"3. too long: {err}")

    seeded = [await generate(client, q, 16, temperature=0.8, top_p=0.9, top_k=50, seed=7)
              for _ in range(2)]
    ok &= seeded[0][0] == seeded[1][0]
    print(f"   seeded sampling repeatable: {seeded[0][0] == seeded[1][0]}")

    first_token = asyncio.Event()
    long_task = asyncio.create_task(
        generate(client, chat_ids(tok, "Write a long essay about the ocean."), 500,
                 cancel_after=6, on_first=first_token.set, temperature=0.0))
    await first_token.wait()
    running_during = metrics(args.metrics).get("ragserve_engine_running_sequences")
    toks, why = await long_task
    await asyncio.sleep(0.5)  # one decode step is ~0.1 s
    after = metrics(args.metrics)
    await asyncio.sleep(1.0)
    later = metrics(args.metrics)
    freed = (running_during == 1 and after.get("ragserve_engine_running_sequences") == 0
             and later.get("ragserve_engine_generated_tokens_total")
             == after.get("ragserve_engine_generated_tokens_total"))
    ok &= freed
    print(f"4. cancel: got {len(toks)} tokens ({why}); running gauge during={running_during} "
          f"after={after.get('ragserve_engine_running_sequences')}; token counter still "
          f"after 1 s -> freed={freed}")
    print(f"5. metrics: {after}")
    ok &= {"ragserve_engine_running_sequences", "ragserve_engine_waiting_sequences",
           "ragserve_engine_generated_tokens_total"} <= after.keys()

    if not args.skip_bench:
        print("6. concurrent greedy streams, 64 tokens each (ignore finish: short answers "
              "end early, tokens counted as received)")
        prompts = [chat_ids(tok, t) for t in ("Write a short story about a lighthouse keeper.",
                                              "Explain how vaccines work.",
                                              "Describe the water cycle in detail.",
                                              "What are the benefits of exercise?")]
        for c in (1, 4, 16):
            t0 = time.perf_counter()
            res = await asyncio.gather(*(generate(client, prompts[i % 4], 64, temperature=0.0)
                                         for i in range(c)))
            n = sum(len(r[0]) for r in res)
            print(f"   {c:>2} concurrent: {n / (time.perf_counter() - t0):6.1f} tokens/s "
                  f"({n} tokens)")

    await client.close()
    print("OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
