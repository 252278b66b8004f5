"""Sparse selection, MaxSim, their request checks and registry facts, without processes
(tests/test_sparse_multivector_e2e.py runs them through Triton)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ragserve.v1 import embed_pb2
from ragserve_server.encoding import multivector, sparse
from ragserve_server.errors import InvalidInput
from ragserve_server.models.builtin import builtin_specs, minilm_spec
from ragserve_server.models.catalog import MAXSIM, build_catalog
from ragserve_server.models.registry import DENSE, MULTI_VECTOR, SPARSE
from ragserve_server.services import embed_outputs
from ragserve_server.settings import Settings


def test_select_keeps_the_largest_first_with_ties_by_index():
    weights = np.array([[0.0, 2.0, 0.5, 2.0, 0.0, 1.0]], dtype=np.float32)
    ((indices, values),) = sparse.select(weights, sparse.options(top_k=None, threshold=None))
    assert indices.tolist() == [1, 3, 5, 2] and values.tolist() == [2.0, 2.0, 1.0, 0.5]
    ((indices, _),) = sparse.select(weights, sparse.options(top_k=2, threshold=None))
    assert indices.tolist() == [1, 3]
    ((indices, _),) = sparse.select(weights, sparse.options(top_k=None, threshold=0.5))
    assert indices.tolist() == [1, 3, 5]  # strictly above the threshold
    ((indices, values),) = sparse.select(np.zeros((1, 4), dtype=np.float32), sparse.options(top_k=3, threshold=None))
    assert indices.size == 0 and values.size == 0


@pytest.mark.parametrize(
    ("top_k", "threshold", "words"),
    [(0, None, "sparse_top_k must be at least 1"), (None, -0.1, "sparse_threshold"), (None, float("nan"), "finite")],
)
def test_bad_sparse_options(top_k, threshold, words):
    with pytest.raises(InvalidInput, match=words):
        sparse.options(top_k=top_k, threshold=threshold)


def test_maxsim_is_the_sum_of_best_cosines():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    query = unit(rng.normal(size=(3, 8)))
    documents = [unit(rng.normal(size=(n, 8))) for n in (1, 5, 9)]
    want = [sum(max(float(q @ d) for d in doc) for q in query) for doc in documents]
    np.testing.assert_allclose(multivector.maxsim(query, documents), want, atol=1e-12)
    assert multivector.maxsim(query, [np.zeros((0, 8))]).tolist() == [-3.0]  # no content token: the lowest score


def _model(output: str):
    from ragserve_server.models.catalog import served

    return replace(served(minilm_spec())[0], name="m", embedding_output=output)


def test_dense_model_refuses_sparse_options():
    request = embed_pb2.EmbedRequest(inputs=["a"], sparse_top_k=3)
    with pytest.raises(InvalidInput, match="sparse_top_k is for sparse models"):
        embed_outputs.check_dense(_model(DENSE), request)


@pytest.mark.parametrize(
    ("output", "fields", "words"),
    [
        (SPARSE, {"dimensions": 4}, "dimensions cannot cut"),
        (MULTI_VECTOR, {"dimensions": 4}, "dimensions cannot cut"),
        (SPARSE, {"encoding": embed_pb2.EMBEDDING_ENCODING_UINT8}, "EMBEDDING_ENCODING_UINT8 is for dense vectors"),
        (MULTI_VECTOR, {"normalize": False}, "unit-length token vectors"),
        (SPARSE, {"normalize": True}, "not normalised"),
        (MULTI_VECTOR, {"sparse_threshold": 0.1}, "sparse_threshold is for sparse models"),
        (SPARSE, {"sparse_top_k": 0}, "at least 1"),
    ],
)
def test_options_that_do_not_apply_are_refused(output, fields, words):
    with pytest.raises(InvalidInput, match=words):
        embed_outputs.sparse_options(_model(output), embed_pb2.EmbedRequest(inputs=["a"], **fields))


def test_sparse_options_accept_the_sdk_default_encoding():
    request = embed_pb2.EmbedRequest(inputs=["a"], sparse_top_k=5, encoding=embed_pb2.EMBEDDING_ENCODING_FLOAT32_BYTES)
    assert embed_outputs.sparse_options(_model(SPARSE), request) == sparse.SparseOptions(top_k=5, threshold=0.0)


def test_make_run_serves_the_minilm_maxsim_reranker_by_default():
    names = [n.strip() for n in Settings().triton_models.split(",")]
    catalog = build_catalog(builtin_specs(names=names))
    maxsim = catalog.get("all-minilm-l6-v2-maxsim", (MAXSIM,))
    assert maxsim.triton_model == "minilm_tokens" and maxsim.embedding_model == "all-minilm-l6-v2-tokens"
    assert catalog.get("all-minilm-l6-v2-tokens", ("embedding",)).embedding_output == MULTI_VECTOR
    # MiniLM itself, its bi-encoder and the default reranker are as before.
    assert catalog.get("", ("embedding",)).name == "all-minilm-l6-v2"
    assert catalog.get("all-minilm-l6-v2", ("embedding",)).embedding_output == DENSE
    assert catalog.defaults["bi_encoder"] == "all-minilm-l6-v2-bi-encoder"


def test_registry_refuses_maxsim_without_token_vectors():
    with pytest.raises(ValueError, match="maxsim_reranker needs a multi_vector model"):
        replace(minilm_spec(), maxsim_reranker="x", bi_encoder=False).validate()
    with pytest.raises(ValueError, match="unknown embedding_output"):
        replace(minilm_spec(), embedding_output="ragged").validate()


def test_an_exported_multi_vector_model_renamed_serves_its_reranker_under_the_new_name():
    tokens = builtin_specs(names=["minilm_tokens"])[0]
    catalog = build_catalog([replace(tokens, name="mine", maxsim_reranker="{name}-maxsim")])
    assert [m.name for m in catalog.models] == ["mine", "mine-maxsim"]


# --- the PyTorch GPU variant's heads (scripts/templates/torch_encoder_model.py), run on the CPU ---


def _torch_variant(monkeypatch, tmp_path, exporter, build, name):
    """Exports a tiny model, renders its PyTorch (torch_cuda) config, and initialises the template on the CPU."""
    import json
    import sys

    from google.protobuf import json_format

    from support import ROOT, load_template
    from ragserve_server.models import model_config
    from ragserve_server.models.manifest import exported_spec
    from ragserve_server.models.registry import GPU, TORCH_CUDA
    from ragserve_server.models.repository import render_repository

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    module = __import__(exporter)
    folder = build(tmp_path / "hf")
    module.export(folder, tmp_path / "repo" / name, name=name, cores=1)
    spec = exported_spec(tmp_path / "repo" / name)
    render_repository([spec], GPU, tmp_path / "gpu", source=tmp_path / "repo", encoder_backend=TORCH_CUDA)
    config = model_config.read(tmp_path / "gpu" / name / "config.pbtxt")
    template = load_template(monkeypatch, "torch_encoder_model.py")
    model = template.TritonPythonModel()
    model.initialize({
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(tmp_path / "gpu" / name), "model_version": "1", "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
    })
    sys.modules.pop(exporter, None)
    return spec, folder, model


def _batch(folder, texts):
    from ragserve_server.encoding.tokenization import TRUNCATE_END, EncoderTokenizer

    tokenizer = EncoderTokenizer(folder / "tokenizer.json", 128)
    encodings = tokenizer.encodings(texts, TRUNCATE_END)
    return encodings, tokenizer.pad([e.ids for e in encodings], 64)


def test_torch_variant_token_embeddings_head_matches_transformers(monkeypatch, tmp_path):
    from support import BackendRequest
    from test_sparse_multivector_e2e import TEXTS, build_tiny_colbert, colbert_projection, token_reference

    _, folder, model = _torch_variant(monkeypatch, tmp_path, "export_multivector", build_tiny_colbert, "colbert")
    encodings, batch = _batch(folder, TEXTS)
    (response,) = model.execute([BackendRequest(input_ids=batch.input_ids, attention_mask=batch.attention_mask)])
    got = response[0].array
    for row, (encoding, (ids, want)) in enumerate(zip(encodings, token_reference(folder, TEXTS, colbert_projection(folder)))):
        keep = np.array(encoding.special_tokens_mask) == 0
        np.testing.assert_allclose(got[row, : len(encoding.ids)][keep], want, atol=1e-4, rtol=0)


def test_torch_variant_splade_head_matches_transformers(monkeypatch, tmp_path):
    from support import BackendRequest
    from test_sparse_multivector_e2e import TEXTS, build_tiny_splade, splade_reference

    _, folder, model = _torch_variant(monkeypatch, tmp_path, "export_sparse", build_tiny_splade, "splade")
    _, batch = _batch(folder, TEXTS)
    (response,) = model.execute([BackendRequest(input_ids=batch.input_ids, attention_mask=batch.attention_mask)])
    np.testing.assert_allclose(response[0].array, splade_reference(folder, TEXTS), atol=1e-4, rtol=0)


def test_list_models_says_what_each_output_is():
    from ragserve.v1 import models_pb2
    from ragserve_server.services.models import model_info

    dense, sparse_info, tokens = (model_info(_model(o), False) for o in (DENSE, SPARSE, MULTI_VECTOR))
    assert dense.embedding_output == models_pb2.EMBEDDING_OUTPUT_DENSE and dense.dimensions_may_be_cut
    assert dense.pooling == models_pb2.POOLING_MEAN
    for info in (sparse_info, tokens):
        assert not info.dimensions_may_be_cut and list(info.encodings) == [embed_pb2.EMBEDDING_ENCODING_FLOAT]
        assert info.pooling == models_pb2.POOLING_UNSPECIFIED
    assert sparse_info.embedding_output == models_pb2.EMBEDDING_OUTPUT_SPARSE and not sparse_info.normalized_by_model
    assert tokens.embedding_output == models_pb2.EMBEDDING_OUTPUT_MULTI_VECTOR and tokens.normalized_by_model
