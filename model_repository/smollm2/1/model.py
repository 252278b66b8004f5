"""Triton python-backend model: SmolLM2 text generation with in-flight batching.

The batching engine lives in ``engine.py`` next to this file (one background thread that
decodes every running sequence together, one step at a time; see its docstring). This
module only translates between Triton requests/responses and engine sequences.

Contract: TensorRT-LLM's ``tensorrt_llm`` model (decoupled, ``max_batch_size > 0``)
-------------------------------------------------------------------------------------
The tensors, names and dtypes of TensorRT-LLM's Triton backend (the table and its source:
server/ragserve_server/models/generation_contract.py), so that the gateway talks to this model and
to a TensorRT-LLM engine alike. Every tensor has a batch dimension of 1 per request.

Inputs: ``input_ids`` INT32 [-1] (prompt token ids), ``input_lengths`` INT32 (how many of
them), ``request_output_len`` INT32 (max new tokens, >= 1); optional ``end_id`` INT32
(generation stops there; absent: the checkpoint's EOS ids), ``streaming`` BOOL (absent:
false), ``temperature`` FP32, ``runtime_top_k`` INT32, ``runtime_top_p`` FP32,
``repetition_penalty`` FP32, ``seed`` UINT64, ``presence_penalty`` FP32,
``frequency_penalty`` FP32, ``return_log_probs`` BOOL, ``stop_words_list`` INT32 [2, n]
(TensorRT-LLM's layout: row 0 the words' tokens one after the other, row 1 each word's end
offset, padded with -1); and two inputs of ours that TensorRT-LLM lacks: ``min_p`` FP32 and
``num_top_logprobs`` INT32 (absent values and their ranges: ``sampler.SamplingParams``, as
in TensorRT-LLM: top-k and top-p both off = greedy).

Responses, as TensorRT-LLM's: ``output_ids`` INT32 [1, 1, n] with the new tokens and
``sequence_length`` INT32 [1, 1] = n; with ``return_log_probs``, ``output_log_probs`` FP32
[1, 1, n] (log_softmax of the raw logits at each new token) and ``cum_log_probs`` FP32 [1, 1]
(their sum since the start); with ``num_top_logprobs`` k > 0, ours: ``top_logprobs_ids`` INT32
and ``top_logprobs`` FP32 [1, 1, n, k], most likely first. A sequence that ends on a stop
word returns the word's tokens (as TensorRT-LLM). Streaming: one response per generated token; the
last one carries TRITONSERVER_RESPONSE_COMPLETE_FINAL. The end id is never returned: when
the sequence ends on it, the final response holds n = 0 tokens. Not streaming: one final
response with all tokens.

Scoring (prefill only, ours; scoring.py): with the optional input ``candidate_token_ids``
INT32 [N] (1..64 ids) the prompt is prefilled and nothing is generated: one final response
carries ``candidate_logits`` FP32 [1, N] (the raw logits of those ids at the prompt's last
position, in the order given) with an empty ``output_ids`` [1, 1, 0] and ``sequence_length``
0. ``request_output_len`` is still required by the contract and ignored; sampling inputs are
ignored. There is no finish reason tensor (TensorRT-LLM has none): a
final response before ``request_output_len`` tokens means the end id was reached.

Errors are one final response carrying an error whose message starts with a status name:
``INVALID_ARGUMENT: ...`` (empty prompt, request_output_len < 1, prompt + output length >
context length or > the KV budget, token id out of range, bad sampling values; Triton code
INVALID_ARG), ``RESOURCE_EXHAUSTED: ...`` (waiting queue full; Triton code UNAVAILABLE:
this Triton has no RESOURCE_EXHAUSTED code), ``INTERNAL: ...`` (engine failure).

Cancellation: the engine asks Triton whether running and waiting requests were cancelled at
most every few milliseconds (engine.CANCEL_POLL_INTERVAL_S), outside its lock; a cancelled
one is dropped at the next step after that, its slot and KV reservation freed, and
its stream is closed with an empty final response (``send(flags=FINAL)``) when Triton
still accepts it.

Parameters (config.pbtxt): ``hf_dir`` (weights, relative to the model's directory) and the
engine's settings (``engine_config.EngineConfig``: all required, no defaults here).

Metrics (Triton's metrics port), labelled ``model="<name>"``: gauges
``ragserve_engine_running_sequences``, ``ragserve_engine_waiting_sequences``,
``ragserve_engine_prefilling_sequences``, ``ragserve_engine_kv_tokens_reserved``, counter ``ragserve_engine_generated_tokens_total``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # engine.py, llama.py, sampler.py

from engine import FINISH_STOP, Engine, EngineStats, Sequence  # noqa: E402
from engine_config import EngineConfig, instance_device_index  # noqa: E402
from sampler import RequestError, SamplingParams, TokenLogprobs  # noqa: E402
from scoring import ScoreRequest  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ERROR_CODES = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "RESOURCE_EXHAUSTED": "UNAVAILABLE",
    "UNAVAILABLE": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
    "INTERNAL": "INTERNAL",
}
# Request tensor -> SamplingParams field; an absent tensor keeps the field's default.
SAMPLING_INPUTS = {
    "temperature": "temperature",
    "runtime_top_k": "top_k",
    "runtime_top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "return_log_probs": "logprobs",
    "min_p": "min_p",
    "num_top_logprobs": "top_logprobs",
}


def _error(message: str) -> "pb_utils.TritonError":
    code = getattr(pb_utils.TritonError, ERROR_CODES.get(message.split(":", 1)[0], "INTERNAL"),
                   None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


# The Triton 2.51 stub's pybind11 predates numpy 2 and misreads numpy 2 arrays (outputs reach
# Triton empty), so under numpy 2 tensors cross the python backend as DLPack; under numpy 1,
# whose DLPack export breaks in the stub ("used_dlpack" capsule), the numpy path stays.
NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def _array(tensor) -> np.ndarray:
    """An input tensor's values (a view: read within execute, as every caller here does)."""
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()


def _tensor(name: str, array: np.ndarray) -> "pb_utils.Tensor":
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array)) if NUMPY_2 else pb_utils.Tensor(name, array)


def _scalar(request, name: str):
    """The one value of an input tensor ([1] or [1, 1] with the batch dimension), or None."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = _array(tensor).reshape(-1)
    if arr.size != 1:
        raise RequestError("INVALID_ARGUMENT", f"{name} must hold exactly one value per request")
    return arr[0].item()


def _stop_words(request) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM's stop_words_list [1, 2, n]: the words' tokens, then each word's end offset."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop_words_list")
    if tensor is None:
        return ()
    arr = _array(tensor)
    if arr.ndim != 3 or arr.shape[:2] != (1, 2):
        raise RequestError("INVALID_ARGUMENT", f"stop_words_list must be [1, 2, n], got {list(arr.shape)}")
    ids, offsets = arr[0, 0].tolist(), [o for o in arr[0, 1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if not start < end <= len(ids):
            raise RequestError("INVALID_ARGUMENT", f"stop_words_list: offset {end} out of order or past {len(ids)}")
        words.append(tuple(ids[start:end]))
        start = end
    return tuple(words)


def _response(tokens: list[int], logprobs: list[TokenLogprobs] | None, cum: float,
              top_k: int) -> "pb_utils.InferenceResponse":
    n = len(tokens)
    tensors = [
        _tensor("output_ids", np.array(tokens, dtype=np.int32).reshape(1, 1, n)),
        _tensor("sequence_length", np.array([[n]], dtype=np.int32)),
    ]
    if logprobs is not None:
        tensors += [
            _tensor("output_log_probs", np.array([lp.logprob for lp in logprobs], dtype=np.float32).reshape(1, 1, n)),
            _tensor("cum_log_probs", np.array([[cum]], dtype=np.float32)),
        ]
        if top_k:
            tensors += [
                _tensor("top_logprobs_ids", np.array([lp.top_ids for lp in logprobs], dtype=np.int32).reshape(1, 1, n, top_k)),
                _tensor("top_logprobs", np.array([lp.top_logprobs for lp in logprobs], dtype=np.float32).reshape(1, 1, n, top_k)),
            ]
    return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        name = config.get("name", "smollm2")
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{name} must be a decoupled model")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        hf_dir = params.pop("hf_dir", "") or os.path.join(args["model_version"], "hf")
        hf_dir = os.path.join(args["model_repository"], hf_dir)  # no-op when absolute
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise pb_utils.TritonModelException(
                f"{hf_dir} not built: run scripts/convert_smollm2.py --out {hf_dir}")
        device_index = instance_device_index(args)  # KIND_GPU: one instance per GPU, this one's
        try:
            engine_config = EngineConfig.from_parameters(params)
            engine_config.torch_device(device_index)
        except (ValueError, RuntimeError) as exc:
            raise pb_utils.TritonModelException(f"{name}: {exc} (config.pbtxt parameters)") from exc

        labels = {"model": name}
        self._families = [
            pb_utils.MetricFamily(name="ragserve_engine_running_sequences",
                                  description="Sequences decoding in the in-flight batch",
                                  kind=pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily(name="ragserve_engine_waiting_sequences",
                                  description="Sequences queued for a batch slot",
                                  kind=pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily(name="ragserve_engine_prefilling_sequences",
                                  description="Sequences holding a batch slot while their prompt "
                                              "is prefilled in chunks (0 or 1)",
                                  kind=pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily(name="ragserve_engine_kv_tokens_reserved",
                                  description="KV cache tokens reserved by running sequences "
                                              "(prompt + max tokens each)",
                                  kind=pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily(name="ragserve_engine_generated_tokens_total",
                                  description="Tokens generated by the engine",
                                  kind=pb_utils.MetricFamily.COUNTER),
        ]
        self._running, self._waiting, self._prefilling, self._kv_reserved, self._tokens = (
            f.Metric(labels=labels) for f in self._families)

        self.engine = Engine(hf_dir, engine_config, on_stats=self._record, device_index=device_index).start()
        pb_utils.Logger.log_info(
            f"{name} engine ready: hf={hf_dir} {engine_config} "
            f"context={self.engine.context_length} eos={sorted(self.engine.eos)}")

    def _record(self, stats: EngineStats) -> None:
        self._running.set(stats.running)
        self._waiting.set(stats.waiting)
        self._prefilling.set(stats.prefilling)
        self._kv_reserved.set(stats.kv_tokens_reserved)
        if stats.step_tokens:
            self._tokens.increment(stats.step_tokens)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                candidates = pb_utils.get_input_tensor_by_name(request, "candidate_token_ids")
                if candidates is not None:
                    self.engine.submit_score(self._score_request(request, sender, candidates))
                    continue
                seq = self._sequence(request, sender)
                self.engine.submit(seq)
            except RequestError as exc:
                sender.send(pb_utils.InferenceResponse(error=_error(str(exc))), flags=FINAL)
            except Exception as exc:  # malformed input tensors and the like
                sender.send(pb_utils.InferenceResponse(
                    error=_error(f"INVALID_ARGUMENT: {exc}")), flags=FINAL)
        return None  # decoupled: responses go through the senders

    def _prompt(self, request) -> np.ndarray:
        ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids_tensor is None:
            raise RequestError("INVALID_ARGUMENT", "input_ids is required")
        ids = _array(ids_tensor).reshape(-1)
        length = _scalar(request, "input_lengths")
        if length is not None:
            if not 0 <= length <= ids.size:
                raise RequestError("INVALID_ARGUMENT",
                                   f"input_lengths is {length}, input_ids holds {ids.size} ids")
            ids = ids[:length]
        return ids

    def _score_request(self, request, sender, candidates) -> ScoreRequest:
        """A prefill-only request: the logits of ``candidate_token_ids`` after the prompt."""
        ids = [int(t) for t in self._prompt(request)]
        wanted = [int(t) for t in _array(candidates).reshape(-1)]

        def on_result(values: list[float]) -> None:
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                _tensor("output_ids", np.zeros((1, 1, 0), dtype=np.int32)),
                _tensor("sequence_length", np.array([[0]], dtype=np.int32)),
                _tensor("candidate_logits", np.array(values, dtype=np.float32).reshape(1, len(values))),
            ]), flags=FINAL)

        def on_abort(kind: str, message: str) -> None:
            try:
                if kind == "cancelled":
                    sender.send(flags=FINAL)
                else:
                    sender.send(pb_utils.InferenceResponse(error=_error(message)), flags=FINAL)
            except Exception:
                pass

        probe = getattr(sender, "is_cancelled", None) or request.is_cancelled
        return ScoreRequest(prompt=ids, candidates=wanted, on_result=on_result, on_abort=on_abort, is_cancelled=probe)

    def _sequence(self, request, sender) -> Sequence:
        ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids_tensor is None:
            raise RequestError("INVALID_ARGUMENT", "input_ids is required")
        ids = _array(ids_tensor).reshape(-1)
        length = _scalar(request, "input_lengths")
        if length is not None:
            if not 0 <= length <= ids.size:
                raise RequestError("INVALID_ARGUMENT",
                                   f"input_lengths is {length}, input_ids holds {ids.size} ids")
            ids = ids[:length]
        max_tokens = _scalar(request, "request_output_len")
        if max_tokens is None:
            raise RequestError("INVALID_ARGUMENT", "request_output_len is required")
        end_id = _scalar(request, "end_id")
        streaming = bool(_scalar(request, "streaming") or False)
        given = {field: _scalar(request, tensor) for tensor, field in SAMPLING_INPUTS.items()}
        params = SamplingParams(**{k: v for k, v in given.items() if v is not None})
        stop_words = _stop_words(request)
        collected: list[int] = []
        collected_logprobs: list[TokenLogprobs] = []
        cum = [0.0]

        def on_token(token: int, finish_reason: str | None) -> None:
            # TensorRT-LLM leaves the end id out of the output.
            new = [] if finish_reason == FINISH_STOP else [token]
            new_logprobs = None
            if params.logprobs:
                new_logprobs = [seq.sampling.last] if new else []
                cum[0] += sum(lp.logprob for lp in new_logprobs)
            if finish_reason is None and not streaming:
                collected.extend(new)
                collected_logprobs.extend(new_logprobs or ())
                return
            if not streaming:
                new, new_logprobs = collected + new, (None if new_logprobs is None else collected_logprobs + new_logprobs)
            response = _response(new, new_logprobs, cum[0], params.top_logprobs)
            if finish_reason is None:
                sender.send(response)
            else:
                sender.send(response, flags=FINAL)

        def on_abort(kind: str, message: str) -> None:
            pb_utils.Logger.log_verbose(f"request {request.request_id()!r} {kind}: {message}")
            try:
                if kind == "cancelled":
                    sender.send(flags=FINAL)
                else:
                    sender.send(pb_utils.InferenceResponse(error=_error(message)), flags=FINAL)
            except Exception:  # the stream may already be gone; nothing left to tell
                pass

        # Response senders of decoupled models report cancellation themselves in newer
        # Triton; the request does in 2.51+.
        probe = getattr(sender, "is_cancelled", None) or request.is_cancelled
        seq = Sequence(prompt=[int(t) for t in ids], max_tokens=int(max_tokens),
                       params=params, on_token=on_token, on_abort=on_abort,
                       is_cancelled=probe, end_id=None if end_id is None else int(end_id),
                       stop_words=stop_words)
        return seq

    def finalize(self):
        self.engine.stop()
