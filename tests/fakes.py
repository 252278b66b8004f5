"""The one fake model server for fast unit tests: a complete `InferenceBackend`.

Encoders answer with a vector derived from the token ids (`embedding[:, 0]` = sum of the ids,
`[:, 1]` = 1) or a logit per row; the generation model streams the tokens in `tokens` in the
TensorRT-LLM response shape; readiness, batch statistics and model configs (rendered from
the registry) are answered like Triton's. Knobs: `delay` (seconds per call), `fail` (an
exception every call raises, and readiness false). It records the timeouts, lanes and
inputs it was sent. Real-process tests cover everything a user relies on.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ragserve_server.calls.admission import TRITON_PRIORITY
from ragserve_server.models.builtin import BUILTIN
from ragserve_server.models.registry import ONNXRUNTIME
from ragserve_server.models.repository import triton_config
from support import MODEL_REPOSITORY

_LANE_OF_PRIORITY = {priority: lane for lane, priority in TRITON_PRIORITY.items()}


class FakeBackend:
    def __init__(self, *, delay: float = 0.0, tokens: tuple[int, ...] = (42, 43, 2)) -> None:
        self.delay = delay
        self.fail: Exception | None = None
        self.tokens = tokens
        self.batch_stats = {1: 4, 8: 2, 64: 1}
        self.calls = 0
        self.timeouts: list[float | None] = []
        self.lanes: list[str] = []
        self.requests: list[dict[str, np.ndarray]] = []

    async def infer(self, model, inputs, outputs, *, timeout, priority=0):
        self.calls += 1
        self.timeouts.append(timeout)
        self.lanes.append(_LANE_OF_PRIORITY.get(priority, "default"))
        self.requests.append(dict(inputs))
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(self.delay)
        ids = inputs["input_ids"]
        if "logits" in outputs:
            return {"logits": ids.sum(1, keepdims=True).astype(np.float32) / 1e4}
        vectors = np.zeros((ids.shape[0], 384), dtype=np.float32)
        vectors[:, 0] = ids.sum(1)
        vectors[:, 1] = 1.0
        return {"embedding": vectors}

    async def stream(self, model, inputs, outputs, *, timeout, priority=0):
        self.calls += 1
        self.timeouts.append(timeout)
        if self.fail is not None:
            raise self.fail
        for index, token in enumerate(self.tokens):
            await asyncio.sleep(self.delay)
            final = index == len(self.tokens) - 1
            yield {"output_ids": np.array([[[token]]], dtype=np.int32), "sequence_length": np.array([[1]], dtype=np.int32)}, final

    async def is_ready(self, models):
        return self.fail is None

    async def batch_statistics(self, model):
        return dict(self.batch_stats)

    async def model_config(self, model):
        return triton_config(BUILTIN[model](MODEL_REPOSITORY), ONNXRUNTIME)

    async def close(self):
        pass
