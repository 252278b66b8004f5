"""The generation engine on CUDA against itself on the CPU, and its speed (issue 24).

    python bench/gpu_engine_check.py [--cpu-smoke] [--layers 30] [--tokens 32] [--streams 1,16]

Weights: a Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
vocabulary 49152) with random weights, written here in seconds: SmolLM2's own weights (270 MB
in fp16) cannot travel to a lent GPU machine, and the engine's speed and its fp16 error depend
on the shapes, not on what the weights say. The LM head is scaled up so that next-token
choices have clear margins, as a trained model's mostly do.

1. greedy equality: the same prompts through the engine on the CPU (fp32) and on CUDA (fp16,
   the deployment's CUDA settings, generation_contract.ENGINE_PARAMETERS_CUDA); the token
   streams must agree, except after a step where the CPU's two best tokens were within
   --tie-margin of each other in log probability (fp16 may pick either; the rest of that
   stream is then not compared);
2. tokens/s of the CUDA engine at each --streams level: that many sequences submitted at once,
   each decoding --decode-tokens (end ids ignored), whole-run tokens/s and per-stream tokens/s.

`--cpu-smoke` runs both sides on the CPU (fp32 twice: the comparison must be exact) with a few
layers, to exercise this script where there is no GPU. Prints a table; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"
sys.path.insert(0, str(VERSION_DIR))
sys.path.insert(0, str(ROOT / "server"))

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0)


def random_llama(folder: Path, layers: int, seed: int = 0, head_scale: float = 8.0) -> Path:
    """A random Llama checkpoint in the layout llama.py reads (config.json + model.safetensors)."""
    import torch
    from safetensors.torch import save_file

    s = SMOLLM2_SHAPE
    h, inter, heads, kv, d, vocab = (s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                                     s["num_key_value_heads"], s["head_dim"], s["vocab_size"])
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    weights = {"model.embed_tokens.weight": normal(vocab, h, std=1.0), "model.norm.weight": torch.ones(h),
               "lm_head.weight": normal(vocab, h, std=0.02 * head_scale)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(heads * d, h), p + "self_attn.k_proj.weight": normal(kv * d, h),
            p + "self_attn.v_proj.weight": normal(kv * d, h), p + "self_attn.o_proj.weight": normal(h, heads * d),
            p + "mlp.gate_proj.weight": normal(inter, h), p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
        })
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "tie_word_embeddings": False, **s}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


class Stream:
    def __init__(self):
        self.tokens, self.margins, self.done, self.error = [], [], threading.Event(), None
        self.seq = None

    def on_token(self, token, reason):
        self.tokens.append(token)
        last = self.seq.sampling.last
        if last is not None and len(last.top_logprobs) >= 2:
            self.margins.append(last.top_logprobs[0] - last.top_logprobs[1])
        if reason is not None:
            self.done.set()

    def on_abort(self, kind, message):
        self.error = f"{kind}: {message}"
        self.done.set()


def start_engine(folder: Path, device: str):
    import engine as eng
    from ragserve_server.models.generation_contract import engine_parameters

    params = {k: v for k, v in engine_parameters(device).items() if k != "hf_dir"}
    return eng, eng.Engine(folder, eng.EngineConfig.from_parameters(params)).start()


def run_streams(eng, engine, prompts, max_tokens, *, logprobs: bool, ignore_eos: bool, timeout: float = 600) -> tuple[list[Stream], float]:
    streams = []
    begin = time.perf_counter()
    for prompt in prompts:
        stream = Stream()
        params = eng.SamplingParams(temperature=0.0, logprobs=logprobs, top_logprobs=2 if logprobs else 0)
        stream.seq = eng.Sequence(list(prompt), max_tokens, params, stream.on_token, stream.on_abort, ignore_eos=ignore_eos)
        engine.submit(stream.seq)
        streams.append(stream)
    for stream in streams:
        if not stream.done.wait(timeout):
            raise TimeoutError("a sequence did not finish")
        if stream.error:
            raise RuntimeError(stream.error)
    return streams, time.perf_counter() - begin


def compare(reference: list[Stream], candidate: list[Stream], tie_margin: float) -> tuple[int, int, list[str]]:
    """(streams equal throughout, streams that parted at a near-tie, problems)."""
    equal = ties = 0
    problems = []
    for index, (want, got) in enumerate(zip(reference, candidate)):
        for step, (a, b) in enumerate(zip(want.tokens, got.tokens)):
            if a != b:
                margin = want.margins[step] if step < len(want.margins) else float("inf")
                if margin < tie_margin:
                    ties += 1
                else:
                    problems.append(f"prompt {index}: token {step} is {b}, the CPU's {a} (its margin {margin:.3f} nats)")
                break
        else:
            if len(want.tokens) == len(got.tokens):
                equal += 1
            else:
                problems.append(f"prompt {index}: {len(got.tokens)} tokens, the CPU's {len(want.tokens)}")
    return equal, ties, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="both sides on the CPU, a few layers")
    parser.add_argument("--layers", type=int, default=0, help="layers of the random model (default: 30, smoke: 2)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt for the comparison")
    parser.add_argument("--tie-margin", type=float, default=0.05, help="log-prob gap under which fp16 may pick the other token")
    parser.add_argument("--streams", default="1,16", help="concurrent streams for tokens/s")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per stream for tokens/s")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_engine_check: PyTorch sees no CUDA device; on a machine without a GPU use --cpu-smoke", file=sys.stderr)
        return 2
    layers = args.layers or (2 if smoke else 30)
    device = "cpu" if smoke else "cuda"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (int(torch.randint(8, 200, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory(prefix="gpu-engine-check-") as tmp:
        folder = random_llama(Path(tmp) / "llama", layers)
        eng, cpu = start_engine(folder, "cpu")
        try:
            reference, _ = run_streams(eng, cpu, prompts, args.tokens, logprobs=True, ignore_eos=True)
        finally:
            cpu.stop()
        eng, engine = start_engine(folder, device)
        try:
            candidate, _ = run_streams(eng, engine, prompts, args.tokens, logprobs=True, ignore_eos=True)
            speeds = []
            for level in (int(n) for n in args.streams.split(",")):
                run_streams(eng, engine, prompts[:1], 8, logprobs=False, ignore_eos=True)  # warm
                streams, seconds = run_streams(eng, engine, [prompts[i % len(prompts)] for i in range(level)],
                                               args.decode_tokens, logprobs=False, ignore_eos=True)
                total = sum(len(s.tokens) for s in streams)
                speeds.append((level, total / seconds, total / seconds / level, seconds))
        finally:
            engine.stop()
    equal, ties, problems = compare(reference, candidate, 0.0 if smoke else args.tie_margin)
    name = "CPU smoke (fp32 both sides)" if smoke else f"{torch.cuda.get_device_name(0)}, fp16"
    lines = [
        f"generation engine check: {name}; random Llama of SmolLM2-135M's shape, {layers} layers; torch {torch.__version__}",
        f"greedy vs the CPU engine (fp32): {equal}/{len(prompts)} streams equal over {args.tokens} tokens, "
        f"{ties} parted at a near-tie (< {args.tie_margin} nats), {len(problems)} wrong",
        "| streams | tokens/s (all) | tokens/s per stream | seconds |",
        "|---|---|---|---|",
    ] + [f"| {level} | {rate:.0f} | {per:.1f} | {secs:.2f} |" for level, rate, per, secs in speeds] + problems
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
