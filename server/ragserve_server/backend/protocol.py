"""What services need from a model server, in plain types (numpy arrays, str, int).

Every implementation lives elsewhere (`backend.triton.TritonBackend`, `backend.replicas.ReplicaSet`,
the tests' `FakeBackend`); services, health and metrics import only this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol

import numpy as np
from google.protobuf.message import Message

# Triton's priority levels: 0 = the model's default, 1 the highest. The caller's lane decides
# which (calls.admission.TRITON_PRIORITY); the backend only carries it.
DEFAULT_PRIORITY = 0


class InferenceBackend(Protocol):
    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]: ...

    def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        """Responses of a decoupled model as (outputs, is_final); leaving early cancels the request."""
        ...

    async def is_ready(self, models: Sequence[str]) -> bool: ...

    async def batch_statistics(self, model: str) -> dict[int, int]:
        """Executions per batch size (rows) since the server started."""
        ...

    async def model_config(self, model: str) -> Message:
        """The model's configuration as the server runs it (Triton: `inference.ModelConfig`)."""
        ...

    async def close(self) -> None: ...
