"""Generate benchmark: streams at concurrency 1, 4 and 16 with staggered arrivals, side by side
in one run, ragserve (in-flight batching in Triton) vs sequential `transformers` generate.

For each level: aggregate generated tokens/s (all tokens / wall time from first arrival to
last finish) and time to first token p50/p99. The sequential baseline is what a server that
runs `generate` for one request at a time gives: its per-request times are measured once with
transformers on the same folder, then the same staggered arrivals are replayed against them.

With --long-prompt, also: 8 streams decode steadily, then one ~1,500-token prompt arrives;
the inter-token latency (ITL) of the 8 streams, measured client side from the arrival times
of their stream's deltas, steady and while the long prompt is prefilled, with chunked
prefill on (the deployed settings) and off (a copy of the model repository whose engine has
chunked_prefill "0"): two Triton + gateway stacks started first, measured in interleaved
rounds (--rounds), medians shown.

    .venv/bin/python bench/generate_bench.py [--max-tokens 48] [--stagger 0.1]
        [--long-prompt [--rounds 3] [--skip-levels]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, aclosing, contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ragserve  # noqa: E402
from support import GatewayProcess, start_triton  # noqa: E402

HF = ROOT / "model_repository" / "smollm2" / "1" / "hf"
SMOLLM2 = ROOT / "model_repository" / "smollm2"
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


# --- a long prompt arriving while 8 streams decode (--long-prompt) ----------------------

STREAMS = 8
LONG_PROMPT_TOKENS = 1500  # + the chat template; within the context (2048) and max_kv_tokens


def long_prompt_text(tokens: int = LONG_PROMPT_TOKENS) -> tuple[str, int]:
    """A user message whose chat prompt has about `tokens` tokens, and that count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HF)
    notes = []
    while True:
        i = len(notes)
        notes.append(f"Note {i}: the {TOPICS[i % len(TOPICS)]} report of day {i % 31} was filed by team {i * 7 % 13}.")
        text = " ".join(notes) + " Which team filed the last report?"
        n = len(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"])
        if n >= tokens:
            return text, n


def variant_repository(work: Path, name: str, **parameters: str) -> Path:
    """A model repository holding a copy of smollm2 whose engine parameters are changed
    (config.pbtxt edited; the version folder's files linked)."""
    repository = work / f"repo-{name}"
    version = repository / "smollm2" / "1"
    version.mkdir(parents=True)
    config = (SMOLLM2 / "config.pbtxt").read_text()
    for key, value in parameters.items():
        config, found = re.subn(rf'(key: "{key}"\s*value \{{\s*string_value: )"[^"]*"', rf'\1"{value}"', config)
        if not found:
            raise ValueError(f"no engine parameter {key} in {SMOLLM2 / 'config.pbtxt'}")
    (repository / "smollm2" / "config.pbtxt").write_text(config)
    for entry in (SMOLLM2 / "1").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, version / entry.name)
    return repository


@contextmanager
def generate_stack(work: Path, repository: Path) -> Iterator[str]:
    """Triton (smollm2 only) + gateway on free loopback ports; yields the gateway's address."""
    work.mkdir(parents=True, exist_ok=True)
    triton = start_triton(work, ["smollm2"], repository)
    try:
        gateway = GatewayProcess(triton.grpc_url, ["smollm2"], work / "gateway.log")
        try:
            gateway.wait_serving(timeout=120)
            yield gateway.address
        finally:
            gateway.stop()
    finally:
        triton.stop()
        if triton.process is not None and triton.process.returncode:  # its log goes with the temporary folder
            print(f"Triton ({repository}) exited with {triton.process.returncode}; its log ends:\n"
                  + "".join(triton.log_path.read_text(errors="replace").splitlines(True)[-15:]), file=sys.stderr)


async def long_prompt_round(address: str, long_text: str, steady_s: float, after_s: float) -> dict:
    """8 streams (list prompts: greedy, they run past 250 tokens without an end of sequence,
    and every token is text, so one delta per token); after `steady_s` of steady decoding the
    long prompt is sent (max_tokens 1); `after_s` after its first token the streams are
    cancelled. Times are client-side delta arrivals."""
    async with ragserve.AsyncClient(address, timeout=600) as client:
        await client.generate("warm up", max_tokens=2, temperature=0)
        arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
        done = asyncio.Event()
        finished = [False] * STREAMS

        async def stream(i: int, messages) -> None:
            await asyncio.sleep(i * 0.05)
            # Enough tokens to span the whole measurement (~7 a second on 2 CPUs); the stream
            # is cancelled when it is over (closing the SDK's stream cancels the call).
            async with aclosing(client.stream(messages=messages, max_tokens=600, temperature=0)) as events:
                async for event in events:
                    if isinstance(event, ragserve.GenerateResult):
                        finished[i] = True
                        return
                    arrivals[i].append(time.perf_counter())
                    if done.is_set():
                        return

        streams = [asyncio.create_task(stream(i, m)) for i, m in enumerate(chats(STREAMS))]
        while any(len(a) < 3 and not s.done() for a, s in zip(arrivals, streams)):  # all 8 decoding
            await asyncio.sleep(0.05)
        steady_from = time.perf_counter()
        await asyncio.sleep(steady_s)
        sent = time.perf_counter()
        first = prompt_tokens = None
        async with aclosing(client.stream(messages=[{"role": "user", "content": long_text}], max_tokens=1, temperature=0)) as events:
            async for event in events:
                if first is None:
                    first = time.perf_counter()
                if isinstance(event, ragserve.GenerateResult):
                    prompt_tokens = event.usage.prompt_tokens
        await asyncio.sleep(after_s)
        done.set()
        ended = time.perf_counter()
        await asyncio.gather(*streams)

    steady, during, overall = [], [], []
    for times in arrivals:
        for before, after in zip(times, times[1:]):
            if before < steady_from or after > ended:
                continue
            overall.append(after - before)
            if after <= sent:
                steady.append(after - before)
            elif before < first:  # the gap overlaps the long prompt's prefill
                during.append(after - before)
    finished_early = sum(1 for i in range(STREAMS) if finished[i] and arrivals[i][-1] < first)
    return {
        "steady_p50": percentile(steady, 50), "steady_p99": percentile(steady, 99),
        "during_p50": percentile(during, 50), "during_p99": percentile(during, 99), "during_max": max(during, default=float("nan")),
        "overall_p99": percentile(overall, 99), "long_ttft": first - sent, "prompt_tokens": prompt_tokens,
        "finished_early": finished_early,
    }


async def warm_long(address: str, long_text: str) -> None:
    async with ragserve.AsyncClient(address, timeout=600) as client:
        await client.generate(messages=[{"role": "user", "content": long_text}], max_tokens=1, temperature=0)


def long_prompt_section(args) -> None:
    long_text, prompt_tokens = long_prompt_text()
    variants = {"chunked prefill (deployed)": None, "unchunked (chunked_prefill 0)": {"chunked_prefill": "0"}}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="ragserve-genbench-long-") as tmp, ExitStack() as stacks:
        work = Path(tmp)
        addresses = {}
        for index, (name, parameters) in enumerate(variants.items()):
            repository = variant_repository(work, f"v{index}", **parameters) if parameters else ROOT / "model_repository"
            addresses[name] = stacks.enter_context(generate_stack(work / f"stack{index}", repository))
            # The first long prompt grows the engine's KV cache to its size (allocated and copied
            # once per process, a stall that is not prefill's): done here, outside the rounds.
            asyncio.run(warm_long(addresses[name], long_text))
        for r in range(args.rounds):
            # Interleaved, the order alternating, so that the machine's noise falls on both alike.
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                runs[name].append(asyncio.run(long_prompt_round(addresses[name], long_text, args.steady_seconds, args.after_seconds)))

    def median(name: str, key: str) -> float:
        return float(np.median([run[key] for run in runs[name]]))

    print()
    print(f"Generate, {STREAMS} streams decoding (greedy), then one {prompt_tokens}-token prompt arrives; ITL = gaps between a stream's "
          f"deltas, client side; median of {args.rounds} interleaved round(s)")
    print("steady: before the long prompt is sent; prefill: gaps overlapping its prefill (sent to its first token); overall: both and "
          f"{args.after_seconds:g}s after")
    header = (f"{'setup':30} {'steady p50 ms':>13} {'steady p99 ms':>13} {'prefill p50 ms':>14} {'prefill p99 ms':>14} "
              f"{'prefill max ms':>14} {'overall p99 ms':>14} {'p99 vs steady':>13} {'long TTFT s':>11}")
    print(header)
    print("-" * len(header))
    ratios = {}
    for name in variants:
        ratios[name] = float(np.median([run["during_p99"] / run["steady_p99"] for run in runs[name]]))
        print(f"{name:30} {median(name, 'steady_p50') * 1e3:13.0f} {median(name, 'steady_p99') * 1e3:13.0f} "
              f"{median(name, 'during_p50') * 1e3:14.0f} {median(name, 'during_p99') * 1e3:14.0f} {median(name, 'during_max') * 1e3:14.0f} "
              f"{median(name, 'overall_p99') * 1e3:14.0f} {ratios[name]:12.1f}x {median(name, 'long_ttft'):11.2f}")
    early = sum(run["finished_early"] for name in variants for run in runs[name])
    if early:
        print(f"note: {early} stream(s) ended before the long prompt's first token (fewer ITL samples)")
    print()
    chunked, unchunked = ratios.values()
    print(f"goal: ITL p99 during the long prompt within 2x of steady p99: chunked {chunked:.1f}x, unchunked {unchunked:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--stagger", type=float, default=0.1, help="seconds between arrivals")
    parser.add_argument("--long-prompt", action="store_true", help="also measure ITL while a long prompt arrives, chunked prefill on/off")
    parser.add_argument("--skip-levels", action="store_true", help="only the --long-prompt section")
    parser.add_argument("--rounds", type=int, default=3, help="--long-prompt: interleaved rounds of each setup; medians are shown")
    parser.add_argument("--steady-seconds", type=float, default=4.0, help="--long-prompt: steady decoding measured before the long prompt")
    parser.add_argument("--after-seconds", type=float, default=2.0, help="--long-prompt: decoding measured after its first token")
    args = parser.parse_args()
    if not args.skip_levels:
        levels_section(args)
    if args.long_prompt:
        long_prompt_section(args)


def levels_section(args) -> None:
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
