"""scripts/fuse_onnx.py: the fused MiniLM graph ONNX Runtime runs, and the check that guards it."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from support import MODEL_REPOSITORY, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from fuse_onnx import check  # noqa: E402

from ragserve_server.models.registry import FUSED_ONNX, FUSED_ONNX_MAX_ROWS, ONNXRUNTIME  # noqa: E402

from ragserve_server.models.builtin import minilm_spec  # noqa: E402

PLAIN = MODEL_REPOSITORY / "minilm" / "1" / "model.onnx"
FUSED = MODEL_REPOSITORY / "minilm" / "1" / FUSED_ONNX


def test_minilm_runs_the_fused_graph_for_small_batches_and_it_is_fused():
    parameters = minilm_spec().parameters[ONNXRUNTIME]
    assert parameters["small_batch_onnx_file"] == FUSED_ONNX and parameters["onnx_file"] == "model.onnx"
    assert parameters["small_batch_max_rows"] == str(FUSED_ONNX_MAX_ROWS)
    spec = minilm_spec()
    assert FUSED_ONNX in spec.artifacts[ONNXRUNTIME]  # a missing one stops start-up, naming `make models`
    ops = Counter(node.op_type for node in onnx.load(str(FUSED), load_external_data=False).graph.node)
    assert ops["Attention"] == 6 and ops["EmbedLayerNormalization"] == 1 and ops["SkipLayerNormalization"] == 12


def test_the_fused_graph_equals_the_plain_one():
    check(PLAIN, FUSED)  # raises SystemExit when they differ


def test_a_graph_that_differs_is_refused(tmp_path):
    model = onnx.load(str(FUSED))
    # Perturb the largest weight matrix a little: results move, the check must see it.
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(biggest).copy()
    weights *= 1.05
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    with pytest.raises(SystemExit, match="fused graph differs"):
        check(PLAIN, changed)
