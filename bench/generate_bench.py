"""Generate benchmark: streams at concurrency 1, 4 and 16 with staggered arrivals, side by side
in one run, ragserve (in-flight batching in Triton) vs sequential `transformers` generate.

For each level: aggregate generated tokens/s (all tokens / wall time from first arrival to
last finish) and time to first token p50/p99. The sequential baseline is what a server that
runs `generate` for one request at a time gives: its per-request times are measured once with
transformers on the same folder, then the same staggered arrivals are replayed against them.

    .venv/bin/python bench/generate_bench.py [--max-tokens 48] [--stagger 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ragserve  # noqa: E402
from support import GatewayProcess, start_triton  # noqa: E402

HF = ROOT / "model_repository" / "smollm2" / "1" / "hf"
LEVELS = (1, 4, 16)
TOPICS = ["rivers", "mountains", "birds", "cities", "planets", "trees", "fish", "colours", "metals", "insects", "islands", "deserts", "languages", "instruments", "sports", "fruits"]


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"List as many {TOPICS[i % len(TOPICS)]} as you can, numbered, one per line."}] for i in range(n)]


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- ragserve --------------------------------------------------------------------------

async def ragserve_level(address: str, n: int, max_tokens: int, stagger: float) -> dict:
    async with ragserve.AsyncClient(address, timeout=600) as client:
        await client.generate("warm up", max_tokens=2, temperature=0)
        start = time.perf_counter()

        async def one(i: int, messages) -> tuple[float, float, float, int]:
            await asyncio.sleep(i * stagger)
            sent = time.perf_counter()
            first = None
            async for event in client.stream(messages=messages, max_tokens=max_tokens, temperature=0):
                if first is None:
                    first = time.perf_counter()
                if isinstance(event, ragserve.GenerateResult):
                    return sent - start, first - sent, time.perf_counter() - start, event.usage.completion_tokens
            raise RuntimeError("stream ended without a final message")

        results = await asyncio.gather(*(one(i, m) for i, m in enumerate(chats(n))))
    return summarise(results)


def summarise(results) -> dict:
    """results: (arrival, ttft, finished, tokens) per request, times from the first arrival."""
    tokens = sum(r[3] for r in results)
    wall = max(r[2] for r in results) - min(r[0] for r in results)
    last = max(results, key=lambda r: r[0])
    others_finish = [r[2] for r in results if r is not last]
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50": percentile([r[1] for r in results], 50),
        "ttft_p99": percentile([r[1] for r in results], 99),
        "tokens": tokens,
        "last_first_token": last[0] + last[1],
        "others_first_finish": min(others_finish) if others_finish else float("nan"),
    }


# --- sequential transformers -----------------------------------------------------------

def transformers_runs(n: int, max_tokens: int) -> list[tuple[float, float, int]]:
    """(time to first token, total time, new tokens) of `generate` for each prompt, alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(HF)
    model = AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float32).eval()

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:  # the first put is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    runs = []
    for messages in [[{"role": "user", "content": "warm up"}]] + chats(n):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        runs.append((streamer.first - start, time.perf_counter() - start, out.shape[1] - ids["input_ids"].shape[1]))
    return runs[1:]


def sequential_level(runs, n: int, stagger: float) -> dict:
    results, free_at = [], 0.0
    for i in range(n):
        arrival = i * stagger
        ttft, total, tokens = runs[i]
        begin = max(arrival, free_at)
        free_at = begin + total
        results.append((arrival, begin - arrival + ttft, free_at, tokens))
    return summarise(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--stagger", type=float, default=0.1, help="seconds between arrivals")
    args = parser.parse_args()

    ours = {}
    with tempfile.TemporaryDirectory(prefix="ragserve-genbench-") as tmp:
        triton = start_triton(Path(tmp), ["smollm2"])
        gateway = GatewayProcess(triton.grpc_url, ["smollm2"], Path(tmp) / "gateway.log")
        try:
            gateway.wait_serving(timeout=120)
            for n in LEVELS:
                ours[n] = asyncio.run(ragserve_level(gateway.address, n, args.max_tokens, args.stagger))
        finally:
            gateway.stop()
            triton.stop()
    runs = transformers_runs(max(LEVELS), args.max_tokens)
    theirs = {n: sequential_level(runs, n, args.stagger) for n in LEVELS}

    print()
    print(f"Generate, SmolLM2-135M-Instruct, greedy, max_tokens {args.max_tokens}, arrivals every {args.stagger}s")
    header = f"{'setup':34} {'streams':>7} {'tokens':>6} {'tok/s':>7} {'ttft p50 s':>10} {'ttft p99 s':>10} {'vs 1 stream':>11}"
    print(header)
    print("-" * len(header))
    for name, table in (("ragserve (in-flight batching)", ours), ("sequential transformers generate", theirs)):
        for n in LEVELS:
            row = table[n]
            print(f"{name:34} {n:7d} {row['tokens']:6d} {row['tokens_per_s']:7.1f} {row['ttft_p50']:10.3f} {row['ttft_p99']:10.3f} {row['tokens_per_s'] / table[1]['tokens_per_s']:10.2f}x")
    print()
    sixteen = ours[16]
    print(
        f"goals: 16 streams >= 4x one stream: {sixteen['tokens_per_s'] / ours[1]['tokens_per_s']:.2f}x; "
        f"ragserve vs sequential at 16: {sixteen['tokens_per_s'] / theirs[16]['tokens_per_s']:.2f}x; "
        f"last arrival's first token at {sixteen['last_first_token']:.2f}s, before the first of the other 15 finishes "
        f"({sixteen['others_first_finish']:.2f}s): {sixteen['last_first_token'] < sixteen['others_first_finish']}"
    )


if __name__ == "__main__":
    main()
