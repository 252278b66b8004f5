"""The boundary with Triton: the only module that imports tritonclient.

Services depend on the small `InferenceBackend` protocol (backend/protocol.py); this module implements it over
Triton's KServe v2 gRPC API and turns tritonclient's exceptions (string statuses) into the
gateway's own errors, most specific first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import contextmanager
import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from ragserve_server.observability import tracing
from ragserve_server.backend.protocol import DEFAULT_PRIORITY
from ragserve_server.errors import (
    BackendError,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    RagserveError,
)


def map_triton_error(status: str, message: str) -> RagserveError:
    """The gateway's error for a Triton failure (status: a gRPC status name or tritonclient's string)."""
    # Messages our own Triton models send on purpose carry a status prefix.
    for prefix, error in (("RESOURCE_EXHAUSTED:", Overloaded), ("INVALID_ARGUMENT:", InvalidInput)):
        if prefix in message:
            return error(message[message.index(prefix) + len(prefix) :].strip())
    lowered = message.lower()
    if "exceeds maximum queue size" in lowered:  # the model's queue policy: a full queue, not a dead server
        return Overloaded(f"model server queue is full: {message}")
    if "DEADLINE_EXCEEDED" in status or ("timeout" in lowered and "expired" in lowered):
        return DeadlineExceeded("deadline exceeded while waiting for the model server")
    if "UNAVAILABLE" in status:
        return BackendUnavailable(f"model server unavailable: {message}")
    if "CANCELLED" in status:
        return Cancelled("request cancelled")
    if "RESOURCE_EXHAUSTED" in status:
        return Overloaded(f"model server overloaded: {message}")
    if "unknown model" in lowered or "is not ready" in lowered or "not found" in lowered:
        return BackendUnavailable(f"model not loaded on the model server: {message}")
    return BackendError(f"model server error: {message}")


def _from_rpc_error(exc: grpc.aio.AioRpcError) -> RagserveError:
    return map_triton_error(exc.code().name, exc.details() or "")


@contextmanager
def _mapped_errors():
    try:
        yield
    except InferenceServerException as exc:
        raise map_triton_error(str(exc.status() or ""), str(exc.message() or exc)) from exc
    except grpc.aio.AioRpcError as exc:
        raise _from_rpc_error(exc) from exc


def _infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> service_pb2.ModelInferRequest:
    """A KServe v2 request with raw tensor contents (lighter than tritonclient's InferInput path)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            request.raw_input_contents.append(serialize_byte_tensor(array).tobytes())
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _outputs(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    result = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        else:
            array = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype))
        result[tensor.name] = array.reshape(tuple(tensor.shape))
    return result


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # A restarted Triton is found again within a second, not after minutes of backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonBackend:
    """InferenceBackend over a Triton server's gRPC endpoint (host:port)."""

    def __init__(self, url: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        """`credentials`: TLS to a remote Triton (ragserve_server.security.tls.triton_channel_credentials); None = plaintext."""
        self.url = url
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(url, credentials, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")
        request = _infer_request(model, inputs, outputs)
        # The caller's priority, and its deadline as the request's queue timeout: Triton
        # drops a request whose deadline passed while it queued, before computing it.
        if priority != DEFAULT_PRIORITY:
            request.parameters["priority"].uint64_param = priority
        if timeout is not None:
            request.parameters["timeout"].int64_param = max(1, int(timeout * 1_000_000))
        with _mapped_errors():
            response = await self._stub.ModelInfer(request, timeout=timeout, metadata=tracing.outgoing_metadata())
        return _outputs(response)

    async def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float | None,
        priority: int = DEFAULT_PRIORITY,
    ) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        """Streams the responses of a decoupled model: yields (outputs, is_final).

        Leaving the iteration early (a stop sequence, a cancelled caller, a deadline)
        cancels the gRPC stream, and Triton cancels the request, so the model stops
        computing for it.
        """
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")
        request = _infer_request(model, inputs, outputs)
        # Lets the model close the stream with a final flag that carries no tensors.
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        if priority != DEFAULT_PRIORITY:
            request.parameters["priority"].uint64_param = priority
        call = self._stub.ModelStreamInfer(iter([request]), timeout=timeout, metadata=tracing.outgoing_metadata())
        try:
            async for message in call:
                if message.error_message:
                    raise map_triton_error("", message.error_message)
                response = message.infer_response
                final = response.parameters["triton_final_response"].bool_param if "triton_final_response" in response.parameters else False
                yield _outputs(response), final
                if final:
                    return
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc) from exc
        finally:
            call.cancel()  # no-op once the call is done

    async def is_ready(self, models: Sequence[str]) -> bool:
        # Probes on the inference channel itself: when this says ready, that channel is connected.
        try:
            if not (await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2.0)).ready:
                return False
            for model in models:
                if not (await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=2.0)).ready:
                    return False
            return True
        except grpc.aio.AioRpcError:
            return False

    async def batch_statistics(self, model: str) -> dict[int, int]:
        """Executions per batch size (rows) since Triton started: what the dynamic batcher
        actually ran, for the ragserve_triton_batch_size metric."""
        with _mapped_errors():
            reply = await self._stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model), timeout=5.0)
        sizes: dict[int, int] = {}
        for stats in reply.model_stats:  # one entry per loaded version
            for batch in stats.batch_stats:
                sizes[batch.batch_size] = sizes.get(batch.batch_size, 0) + batch.compute_infer.count
        return sizes

    async def model_config(self, model: str) -> model_config_pb2.ModelConfig:
        """The configuration Triton runs `model` with (its ModelConfig RPC)."""
        with _mapped_errors():
            reply = await self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=5.0)
        return reply.config

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel; with `grace`, the calls in flight get that long to end first."""
        await self._channel.close(grace)
