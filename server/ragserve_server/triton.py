"""The boundary with Triton: the only module that imports tritonclient.

Services depend on the small `InferenceBackend` protocol; this module implements it over
Triton's KServe v2 gRPC API and turns tritonclient's exceptions (string statuses) into the
gateway's own errors, most specific first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ragserve_server.errors import (
    BackendError,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    RagserveError,
)


class InferenceBackend(Protocol):
    """What services need from a model server."""

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *, timeout: float | None
    ) -> dict[str, np.ndarray]: ...

    def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
    ) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]: ...

    async def is_ready(self, models: Sequence[str]) -> bool: ...

    async def execution_stats(self, model: str) -> tuple[int, int]: ...

    async def close(self) -> None: ...


def map_triton_error(exc: InferenceServerException) -> RagserveError:
    """Turns a tritonclient exception into the gateway's error for it."""
    status = str(exc.status() or "")
    message = str(exc.message() or exc)
    # Messages our own Triton models send on purpose carry a status prefix.
    for prefix, error in (("RESOURCE_EXHAUSTED:", Overloaded), ("INVALID_ARGUMENT:", InvalidInput)):
        if prefix in message:
            return error(message[message.index(prefix) + len(prefix) :].strip())
    if "DEADLINE_EXCEEDED" in status or "timeout" in message.lower() and "expired" in message.lower():
        return DeadlineExceeded("deadline exceeded while waiting for the model server")
    if "UNAVAILABLE" in status:
        return BackendUnavailable(f"model server unavailable: {message}")
    if "CANCELLED" in status:
        return Cancelled("request cancelled")
    if "RESOURCE_EXHAUSTED" in status:
        return Overloaded(f"model server overloaded: {message}")
    if "unknown model" in message or "is not ready" in message or "not found" in message.lower():
        return BackendUnavailable(f"model not loaded on the model server: {message}")
    return BackendError(f"model server error: {message}")


@contextmanager
def _mapped_errors():
    try:
        yield
    except InferenceServerException as exc:
        raise map_triton_error(exc) from exc


def _infer_inputs(inputs: Mapping[str, np.ndarray]) -> list[InferInput]:
    result = []
    for name, array in inputs.items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        result.append(tensor)
    return result


class TritonBackend:
    """InferenceBackend over a Triton server's gRPC endpoint (host:port)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = triton_aio.InferenceServerClient(url)

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *, timeout: float | None
    ) -> dict[str, np.ndarray]:
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")
        with _mapped_errors():
            result = await self._client.infer(
                model,
                _infer_inputs(inputs),
                outputs=[InferRequestedOutput(name) for name in outputs],
                client_timeout=timeout,
            )
        return {name: result.as_numpy(name) for name in outputs}

    async def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
    ) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        """Streams the responses of a decoupled model: yields (outputs, is_final).

        Closing the iterator early (a stop sequence, a cancelled caller) cancels the
        Triton request, so the model stops computing for it.
        """
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")

        async def requests():
            yield {
                "model_name": model,
                "inputs": _infer_inputs(inputs),
                "outputs": [InferRequestedOutput(name) for name in outputs],
                "enable_empty_final_response": True,
            }

        responses = self._client.stream_infer(requests(), stream_timeout=timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise map_triton_error(error)
                response = result.get_response()
                final = bool(response.parameters.get("triton_final_response").bool_param) if "triton_final_response" in response.parameters else False
                values = {name: result.as_numpy(name) for name in outputs if result.as_numpy(name) is not None}
                yield values, final
                if final:
                    return
        except InferenceServerException as exc:
            raise map_triton_error(exc) from exc
        finally:
            await _cancel(responses)

    async def is_ready(self, models: Sequence[str]) -> bool:
        try:
            if not await self._client.is_server_ready(client_timeout=2.0):
                return False
            for model in models:
                if not await self._client.is_model_ready(model, client_timeout=2.0):
                    return False
            return True
        except (InferenceServerException, asyncio.TimeoutError, OSError):
            return False

    async def execution_stats(self, model: str) -> tuple[int, int]:
        """(successful requests, model executions) since Triton started: fewer executions
        than requests means the dynamic batcher grouped requests."""
        with _mapped_errors():
            stats = await self._client.get_inference_statistics(model, as_json=True)
        entry = stats["model_stats"][0]
        requests = int(entry.get("inference_stats", {}).get("success", {}).get("count", 0))
        return requests, int(entry.get("execution_count", 0))

    async def close(self) -> None:
        await self._client.close()


async def _cancel(responses) -> None:
    """Cancels an unfinished stream_infer call (aclose() of the async generator)."""
    aclose = getattr(responses, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - already failing or finished: nothing to cancel
            pass
