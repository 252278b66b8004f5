"""What every export script does the same way: a fast tokenizer or a refusal, a staging folder
next to the target (swapped in whole by `publish_export`, so a half-exported folder never looks
built), the ONNX graph of a (input_ids, attention_mask) model written atomically, and the graph
checked against PyTorch before anything is kept."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer

TEMPLATE = Path(__file__).resolve().parent / "templates" / "ort_model.py"
CHECK_TEXTS = ["what is the capital of france?", "Paris is the capital and largest city of France. " * 8, "a"]
# The largest difference from PyTorch an exported graph may have on the check texts.
MAX_ABS_DIFFERENCE = 1e-4


def fast_tokenizer(folder: Path, refusal: type[SystemExit] = SystemExit):
    """The folder's fast tokenizer: the gateway reads its tokenizer.json, so a slow one is refused."""
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    if not tokenizer.is_fast:
        raise refusal(f"{folder}: no fast tokenizer (tokenizer.json) could be built for this model")
    return tokenizer


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` (same filesystem, so the final swap is a rename), removed after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def declared_max_tokens(hf_folder: Path, hf_dir: Path) -> int:
    """sentence-transformers' `max_seq_length` where the folder declares one, else the model's own limit."""
    from ragserve_server.models.catalog import max_tokens_of

    st_config = hf_folder / "sentence_bert_config.json"
    declared = json.loads(st_config.read_text()).get("max_seq_length") if st_config.exists() else None
    return int(declared) if declared else max_tokens_of(hf_dir)


def export_token_graph(model: torch.nn.Module, out: Path, output: str, *, per_token: bool = False) -> None:
    """Writes `model(input_ids, attention_mask) -> output` with dynamic batch and sequence axes
    (and a dynamic sequence axis on the output when it has one row per token), atomically."""
    ids = torch.ones(2, 8, dtype=torch.int64)
    mask = torch.ones(2, 8, dtype=torch.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(tmp),
            input_names=["input_ids", "attention_mask"],
            output_names=[output],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                output: {0: "batch", 1: "seq"} if per_token else {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(out)  # a half-written file never looks built


def check_graph(model: torch.nn.Module, tokenizer, onnx_path: Path, max_tokens: int, output: str, *, per_token: bool = False) -> None:
    """ONNX Runtime must give PyTorch's `output` on the check texts (real tokens only, where the
    output has one row per token) before the export is kept."""
    batch = tokenizer(CHECK_TEXTS, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    feed = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run([output], feed)
    with torch.no_grad():
        want = model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])).numpy()
    if per_token:
        real = feed["attention_mask"].astype(bool)
        got, want = got[real], want[real]
    diff = float(np.abs(got - want).max())
    if diff > MAX_ABS_DIFFERENCE:
        raise SystemExit(f"ONNX export differs from PyTorch by {diff:.2e} on the check texts; not exported")
