#!/usr/bin/env python
"""Decode throughput of the SmolLM2 in-flight batching engine, in process (no Triton),
next to sequential transformers ``generate``, for 1/4/16 concurrent greedy sequences.

Usage: .venv/bin/python bench/engine_speed.py [--tokens 64] [--concurrency 1 4 16]
Needs model_repository/smollm2/1/hf (scripts/convert_smollm2.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"
HF_DIR = VERSION_DIR / "hf"

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines work.",
    "Describe the water cycle in detail.",
    "What are the benefits of exercise?",
]


def load_engine_module():
    sys.path.insert(0, str(VERSION_DIR))  # engine.py imports llama.py and sampler.py from there
    import engine

    return engine


def engine_config(eng_mod, threads: int, max_running: int):
    """The deployment's settings (generation_contract.ENGINE_PARAMETERS), resized for the run."""
    from ragserve_server.models.generation_contract import ENGINE_PARAMETERS

    deployed = eng_mod.EngineConfig.from_parameters(
        {k: v for k, v in ENGINE_PARAMETERS.items() if k != "hf_dir"} | {"device": "cpu"})
    return dataclasses.replace(deployed, num_threads=threads, max_running_sequences=max_running)


def run_engine(eng_mod, engine, prompts, tokens):
    remaining = [len(prompts)]
    all_done = threading.Event()
    first: list[float] = []

    def make_cb():
        seen = [0]

        def cb(token, reason):
            seen[0] += 1
            if seen[0] == 1:
                first.append(time.perf_counter())
            if reason is not None:
                remaining[0] -= 1  # callbacks run on the single engine thread
                if remaining[0] == 0:
                    all_done.set()
        return cb

    t0 = time.perf_counter()
    for p in prompts:
        engine.submit(eng_mod.Sequence(list(p), tokens, eng_mod.SamplingParams(temperature=0),
                                       make_cb(), ignore_eos=True))
    all_done.wait()
    dt = time.perf_counter() - t0
    return len(prompts) * tokens / dt, max(first) - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}],
                                   add_generation_prompt=True)["input_ids"] for p in PROMPTS]
    eng_mod = load_engine_module()
    engine = eng_mod.Engine(HF_DIR, engine_config(eng_mod, args.threads, max(args.concurrency))).start()
    run_engine(eng_mod, engine, ids[:1], 8)  # warm-up

    hf_tps = None
    if not args.no_hf:
        model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32).eval()
        x = torch.tensor([ids[0]])
        model.generate(x, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             do_sample=False)
        hf_tps = (out.shape[1] - x.shape[1]) / (time.perf_counter() - t0)

    print(f"{'concurrent':>10} {'engine tok/s':>13} {'last 1st token s':>17} "
          f"{'HF generate tok/s (sequential)':>31} {'ratio':>6}")
    for c in args.concurrency:
        prompts = [ids[i % len(ids)] for i in range(c)]
        tps, ttft = run_engine(eng_mod, engine, prompts, args.tokens)
        hf = f"{hf_tps:.1f}" if hf_tps else "-"
        ratio = f"{tps / hf_tps:.1f}x" if hf_tps else "-"
        print(f"{c:>10} {tps:>13.1f} {ttft:>17.2f} {hf:>31} {ratio:>6}")
    engine.stop()


if __name__ == "__main__":
    main()
