"""scripts/templates/ort_model.py in-process (a stand-in for Triton's python backend, the real
ONNX files of `make models`): which ONNX Runtime session an execution of n rows runs on, and
that every session gives the plain graph's answer. The bundled Triton runs the same file in
tests/test_embed_e2e.py."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from ragserve_server.models import model_config
from ragserve_server.models.registry import FEW_ROWS_MAX_ROWS, FUSED_ONNX, FUSED_ONNX_MAX_ROWS, ONNXRUNTIME
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.models.repository import triton_config
from support import MODEL_REPOSITORY, BackendRequest, load_template, minilm_tokens

PLAIN = "model.onnx"


def _model(monkeypatch, **parameters: str):
    """The template initialised with minilm's CPU config, `parameters` changed ("" = unset)."""
    config = triton_config(minilm_spec(), ONNXRUNTIME)
    model_config.set_parameters(config, parameters)
    args = {
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(MODEL_REPOSITORY / "minilm"),
        "model_version": "1",
    }
    model = load_template(monkeypatch, "ort_model.py").TritonPythonModel()
    model.initialize(args)
    return model


def _threads(session: ort.InferenceSession) -> int:
    return session.get_session_options().intra_op_num_threads


def test_deployed_minilm_picks_graph_and_threads_by_rows(monkeypatch):
    model = _model(monkeypatch)
    assert minilm_spec().cpu_instances == 2
    # A lone row runs the fused graph on both cores; more rows the plain graph on one thread
    # (registry.FUSED_ONNX_MAX_ROWS says why the two limits are one).
    assert FUSED_ONNX_MAX_ROWS == FEW_ROWS_MAX_ROWS == 1
    assert model.choices[1] == (FUSED_ONNX, 2)
    assert model.choices[2] == (PLAIN, 1)
    assert model.choices[64] == (PLAIN, 1)
    assert set(model.sessions) == {(FUSED_ONNX, 2), (PLAIN, 1)}
    assert all(_threads(session) == threads for (_, threads), session in model.sessions.items())


def test_graph_and_threads_limits_are_independent(monkeypatch):
    model = _model(monkeypatch, small_batch_max_rows="8", few_rows_max_rows="2")
    assert model.choices[2] == (FUSED_ONNX, 2)
    assert model.choices[3] == model.choices[8] == (FUSED_ONNX, 1)
    assert model.choices[9] == (PLAIN, 1)
    assert set(model.sessions) == {(FUSED_ONNX, 2), (FUSED_ONNX, 1), (PLAIN, 1)}
    assert all(_threads(session) == threads for (_, threads), session in model.sessions.items())


def test_without_the_optional_parameters_one_session_runs_everything(monkeypatch):
    model = _model(monkeypatch, small_batch_onnx_file="", few_rows_intra_op_threads="", intra_op_threads="2")
    assert set(model.sessions) == {(PLAIN, 2)}
    assert set(model.choices[1:]) == {(PLAIN, 2)}


@pytest.mark.parametrize("rows", [1, 4, 48])
def test_every_session_gives_the_plain_graphs_answer(monkeypatch, rows):
    model = _model(monkeypatch)
    ran = []
    for key, session in model.sessions.items():
        original = session.run
        monkeypatch.setattr(session, "run", lambda *a, key=key, original=original: ran.append(key) or original(*a), raising=False)
    texts = [f"query {i} about refunds, shipping and the returns policy" for i in range(rows)]
    ids, mask = minilm_tokens(texts, width=16)
    # Split into two requests of one execution, as the dynamic batcher groups them.
    half = max(rows // 2, 1)
    requests = [BackendRequest(input_ids=ids[:half], attention_mask=mask[:half])]
    if rows > half:
        requests.append(BackendRequest(input_ids=ids[half:], attention_mask=mask[half:]))
    responses = model.execute(requests)
    assert ran == [model.choices[rows]]
    got = np.concatenate([response[0].array for response in responses])
    reference = ort.InferenceSession(str(MODEL_REPOSITORY / "minilm" / "1" / PLAIN), providers=["CPUExecutionProvider"])
    want = reference.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    assert got.shape == (rows, 384)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
