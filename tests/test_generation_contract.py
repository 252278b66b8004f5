"""The generation contract: the gateway's request tensors against the TensorRT-LLM tensor
table (generation_contract.INPUTS / OUTPUTS) and against the smollm2 model's config.pbtxt,
and the CPU engine's reading of the same tensors."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from support import import_or_unavailable

from ragserve_server.models import generation_contract as contract
from ragserve_server.models import model_config
from ragserve_server.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "model_repository" / "smollm2"
PROMPT = [1, 9690, 198, 2683, 30, 2]

SETTINGS = [
    contract.Sampling(max_tokens=16),
    contract.Sampling(max_tokens=1, temperature=0),
    contract.Sampling(max_tokens=7, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=2**64 - 1),
]


def _shape_matches(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or s == d for s, d in zip(shape, dims))


@pytest.mark.parametrize("sampling", SETTINGS, ids=["defaults", "greedy", "all-set"])
def test_request_tensors_follow_the_tensorrt_llm_table(sampling):
    tensors = contract.request_tensors(PROMPT, sampling, end_id=2)
    table = {spec.name: spec for spec in contract.INPUTS}
    assert set(tensors) <= set(table), f"not in the TensorRT-LLM table: {set(tensors) - set(table)}"
    assert {s.name for s in contract.INPUTS if not s.optional} <= set(tensors)
    for name, array in tensors.items():
        spec = table[name]
        assert array.dtype == spec.numpy_dtype, name
        # Batch dimension first (max_batch_size > 0), then the config's dims (before reshape).
        assert array.shape[0] == 1 and _shape_matches(array.shape[1:], spec.dims), (name, array.shape, spec.dims)
    assert tensors["input_ids"].tolist() == [PROMPT] and tensors["input_lengths"].tolist() == [[len(PROMPT)]]
    assert tensors["request_output_len"].tolist() == [[sampling.max_tokens]]


def test_the_table_is_tensorrt_llms():
    """The facts copied from tensorrtllm_backend's tensorrt_llm config (SOURCE), pinned; our
    extensions (which a TensorRT-LLM deployment lacks) are optional and named apart."""
    table = {
        s.name: (s.dtype, s.dims, s.reshape, s.optional, s.allow_ragged_batch)
        for s in contract.INPUTS + contract.OUTPUTS
        if s.name not in contract.EXTENSIONS
    }
    extensions = {s.name: (s.dtype, s.dims, s.optional) for s in contract.INPUTS + contract.OUTPUTS if s.name in contract.EXTENSIONS}
    assert extensions == {
        "min_p": ("TYPE_FP32", (1,), True),
        "num_top_logprobs": ("TYPE_INT32", (1,), True),
        "top_logprobs_ids": ("TYPE_INT32", (-1, -1, -1), True),
        "top_logprobs": ("TYPE_FP32", (-1, -1, -1), True),
        "candidate_token_ids": ("TYPE_INT32", (-1,), True),
        "candidate_logits": ("TYPE_FP32", (-1,), True),
    }
    scalar = ((1,), ())
    assert table == {
        "input_ids": ("TYPE_INT32", (-1,), None, True, True),
        "input_lengths": ("TYPE_INT32", *scalar, False, False),
        "request_output_len": ("TYPE_INT32", *scalar, False, False),
        "end_id": ("TYPE_INT32", *scalar, True, False),
        "streaming": ("TYPE_BOOL", *scalar, True, False),
        "temperature": ("TYPE_FP32", *scalar, True, False),
        "runtime_top_k": ("TYPE_INT32", *scalar, True, False),
        "runtime_top_p": ("TYPE_FP32", *scalar, True, False),
        "repetition_penalty": ("TYPE_FP32", *scalar, True, False),
        "seed": ("TYPE_UINT64", *scalar, True, False),
        "stop_words_list": ("TYPE_INT32", (2, -1), None, True, True),
        "presence_penalty": ("TYPE_FP32", *scalar, True, False),
        "frequency_penalty": ("TYPE_FP32", *scalar, True, False),
        "return_log_probs": ("TYPE_BOOL", *scalar, True, False),
        "output_ids": ("TYPE_INT32", (-1, -1), None, False, False),
        "sequence_length": ("TYPE_INT32", (-1,), None, False, False),
        # Outputs TensorRT-LLM always declares; optional here only so that a model without them passes.
        "cum_log_probs": ("TYPE_FP32", (-1,), None, True, False),
        "output_log_probs": ("TYPE_FP32", (-1, -1), None, True, False),
    }
    assert contract.MAX_BATCH_SIZE > 0 and "c2e65b88d85255be30cf50440a91662abeb497dd" in contract.SOURCE


def test_smollm2_config_serves_the_contract():
    config = model_config.read(MODEL_DIR / "config.pbtxt")
    assert model_config.mismatches("smollm2", contract.MAX_BATCH_SIZE, contract.INPUTS, contract.OUTPUTS, config) == []
    # Beyond what the start-up check compares: reshape, optional and ragged flags as TensorRT-LLM's.
    assert list(config.input) == [spec.to_input() for spec in contract.INPUTS]
    assert list(config.output) == [spec.to_output() for spec in contract.OUTPUTS]
    assert config.model_transaction_policy.decoupled and config.max_batch_size == contract.MAX_BATCH_SIZE
    assert model_config.parameters_of(config) == {**contract.ENGINE_PARAMETERS, "device": "cpu"}


def test_a_disagreeing_config_is_named():
    config = model_config.read(MODEL_DIR / "config.pbtxt")
    config.input[0].data_type = model_config.model_config_pb2.TYPE_INT64
    problems = model_config.mismatches("smollm2", contract.MAX_BATCH_SIZE, contract.INPUTS, contract.OUTPUTS, config)
    assert problems == ["smollm2: input 'input_ids' is TYPE_INT64 in Triton's config, the gateway uses TYPE_INT32"]


def test_a_tensorrt_llm_config_without_our_extensions_passes_the_start_up_check():
    config = model_config.read(MODEL_DIR / "config.pbtxt")
    for field in (config.input, config.output):
        keep = [t for t in field if t.name not in contract.EXTENSIONS]
        del field[:]
        field.extend(keep)
    assert model_config.mismatches("smollm2", contract.MAX_BATCH_SIZE, contract.INPUTS, contract.OUTPUTS, config) == []


def test_new_controls_are_sent_only_when_used():
    plain = contract.request_tensors(PROMPT, contract.Sampling(max_tokens=4), end_id=2)
    assert not set(plain) & {"stop_words_list", "presence_penalty", "frequency_penalty", "return_log_probs", "min_p", "num_top_logprobs"}
    assert contract.output_names(contract.Sampling(max_tokens=4)) == ("output_ids", "sequence_length")
    full = contract.Sampling(max_tokens=4, presence_penalty=0.5, frequency_penalty=1.0, min_p=0.1, logprobs=True, top_logprobs=5, stop_token_ids=(7, 9))
    tensors = contract.request_tensors(PROMPT, full, end_id=2)
    assert tensors["stop_words_list"].tolist() == [[[7, 9], [1, 2]]] and tensors["return_log_probs"].tolist() == [[True]]
    assert tensors["num_top_logprobs"].tolist() == [[5]]
    assert contract.output_names(full)[2:] == ("output_log_probs", "cum_log_probs", "top_logprobs_ids", "top_logprobs")


def test_response_logprobs():
    outputs = {
        "output_ids": np.array([5, 6], dtype=np.int32).reshape(1, 1, 2),
        "output_log_probs": np.array([-0.5, -1.5], dtype=np.float32).reshape(1, 1, 2),
        "top_logprobs_ids": np.array([[5, 1], [3, 6]], dtype=np.int32).reshape(1, 1, 2, 2),
        "top_logprobs": np.array([[-0.5, -2.0], [-1.0, -1.5]], dtype=np.float32).reshape(1, 1, 2, 2),
    }
    assert contract.response_logprobs(outputs, [5, 6]) == [
        contract.TokenLogprobs(5, -0.5, ((5, -0.5), (1, -2.0))),
        contract.TokenLogprobs(6, -1.5, ((3, -1.0), (6, -1.5))),
    ]
    assert contract.response_logprobs({"output_ids": outputs["output_ids"]}, [5, 6]) == []
    assert contract.cancelled_by_server({}, True) and not contract.cancelled_by_server({"output_ids": np.zeros((1, 1, 0))}, True)


def test_response_tokens():
    def response(tokens, length=None):
        ids = np.array(tokens, dtype=np.int32).reshape(1, 1, len(tokens))
        return {"output_ids": ids, "sequence_length": np.array([[len(tokens) if length is None else length]], dtype=np.int32)}

    assert contract.response_tokens(response([5, 6])) == [5, 6]
    assert contract.response_tokens(response([])) == []  # the end id's final response
    assert contract.response_tokens(response([5, -1, -1], length=1)) == [5]  # padded beams
    assert contract.response_tokens({}) == []


def test_finish_reason():
    assert contract.finish_reason(completion_tokens=3, max_tokens=3, ended_by_end_id=False) == contract.LENGTH
    assert contract.finish_reason(completion_tokens=2, max_tokens=3, ended_by_end_id=False) == contract.STOP
    assert contract.finish_reason(completion_tokens=3, max_tokens=3, ended_by_end_id=True) == contract.STOP


# ---------------------------------------------------------------- the CPU engine reads the same tensors
@pytest.fixture(scope="module")
def sampler():
    import_or_unavailable("torch")
    sys.path.insert(0, str(MODEL_DIR / "1"))
    import sampler as module

    return module


API_VALUES = dict(
    temperature=[0.0, 0.5, 1.0, -0.1, float("inf")],
    top_p=[1.0, 0.5, 1e-6, 0.0, 1.5],
    top_k=[0, 1, 50, -1],
    repetition_penalty=[1.0, 1.3, 1e-3, 0.0],
    presence_penalty=[0.0, 2.0, -2.5],
    min_p=[0.0, 1.0, 1.5],
)


def test_every_request_the_gateway_accepts_the_engine_accepts_with_the_same_meaning(sampler):
    """The gateway checks our API's ranges, the engine TensorRT-LLM's: what passes the first
    must pass the second, and greedy must stay greedy (and sampling sampling)."""
    fields = {"temperature": "temperature", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
              "repetition_penalty": "repetition_penalty", "seed": "seed", "presence_penalty": "presence_penalty",
              "min_p": "min_p"}
    accepted = 0
    for values in itertools.product(*API_VALUES.values()):
        api = contract.Sampling(max_tokens=4, seed=7, **dict(zip(API_VALUES, values)))
        try:
            api.validate()
        except InvalidInput:
            continue
        accepted += 1
        tensors = contract.request_tensors(PROMPT, api, end_id=2)
        params = sampler.SamplingParams(**{field: tensors[name].reshape(-1)[0].item() for name, field in fields.items() if name in tensors})
        params.validate()
        assert params.greedy == (api.greedy or api.top_k == 1), api
    assert accepted == 3**4 * 2 * 2


def test_score_tensors_follow_the_table_and_read_back():
    """A prefill-only scoring request (the LLM rerankers'): the contract's dtypes and dims, and
    its final response's candidate logits read back (absent or short: None)."""
    import numpy as np

    table = {s.name: s for s in contract.INPUTS}
    tensors = contract.score_tensors(PROMPT, [10539, 5230])
    assert set(tensors) == {"input_ids", "input_lengths", "request_output_len", "candidate_token_ids"}
    for name, array in tensors.items():
        assert array.dtype == table[name].numpy_dtype and array.shape[0] == 1, name
    assert tensors["candidate_token_ids"].tolist() == [[10539, 5230]] and tensors["request_output_len"].tolist() == [[1]]
    assert "candidate_logits" in contract.SCORE_OUTPUT_NAMES
    logits = np.array([[1.5, -0.5]], dtype=np.float32)
    assert contract.response_candidate_logits({"candidate_logits": logits}, 2).tolist() == [1.5, -0.5]
    assert contract.response_candidate_logits({"candidate_logits": logits}, 3) is None
    assert contract.response_candidate_logits({}, 2) is None
