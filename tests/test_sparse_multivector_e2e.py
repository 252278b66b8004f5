"""Sparse (SPLADE) and multi-vector (ColBERT-style) Embed outputs and the MaxSim reranker, end
to end: tiny random models made here (a BertForMaskedLM; a BERT with a sentence-transformers
Dense projection), exported by scripts/export_sparse.py / scripts/export_multivector.py, served
by one real Triton (with MiniLM's built-in per-token twin) behind one gateway, and compared
number for number with transformers on the same folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from ragserve.v1 import embed_pb2, embed_pb2_grpc, models_pb2, models_pb2_grpc, rerank_pb2, rerank_pb2_grpc
from support import MODEL_REPOSITORY, ROOT, GatewayProcess, free_port
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer

pytestmark = pytest.mark.integration

TEXTS = [
    "what is the capital of france?",
    "Paris is the capital and largest city of France, on the Seine.",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 6,
]
QUERY = "where does the fox jump?"
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Foxes live in forests and jump over fences.",
    "x",
    "A completely unrelated sentence about databases and indexes. " * 5,
]
SPLADE, COLBERT = "tiny-splade", "tiny-colbert"
HIDDEN, PROJECTED = 32, 16


def _tiny_bert_config():
    from transformers import BertConfig

    from reference import MINILM_DIR as minilm

    vocab = json.loads((minilm / "config.json").read_text())["vocab_size"]
    return BertConfig(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )


def build_tiny_splade(folder: Path) -> Path:
    """A random BertForMaskedLM with MiniLM's tokenizer (BERT's vocabulary), save_pretrained."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from reference import MINILM_DIR as minilm

    torch.manual_seed(1)
    model = BertForMaskedLM(_tiny_bert_config()).eval()
    with torch.no_grad():  # wider logits: more non-zero weights, spread out
        model.cls.predictions.decoder.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def build_tiny_colbert(folder: Path) -> Path:
    """A random BERT plus a sentence-transformers / PyLate Dense projection (HIDDEN -> PROJECTED,
    no bias, identity activation) listed in modules.json."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertModel

    from reference import MINILM_DIR as minilm

    torch.manual_seed(2)
    BertModel(_tiny_bert_config()).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    dense = folder / "1_Dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps(
        {"in_features": HIDDEN, "out_features": PROJECTED, "bias": False, "activation_function": "torch.nn.modules.linear.Identity"}
    ))
    save_file({"linear.weight": torch.randn(PROJECTED, HIDDEN)}, str(dense / "model.safetensors"))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    return folder


# --- references: transformers on the same folders ----------------------------------------


def splade_reference(folder: Path, texts: list[str]) -> np.ndarray:
    """SPLADE: per vocabulary entry, max over real tokens of log(1 + ReLU(MLM logits))."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    weights = torch.log1p(torch.relu(logits)) * batch["attention_mask"].unsqueeze(-1)
    return weights.max(dim=1).values.numpy()


def token_reference(folder: Path, texts: list[str], projection: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: (token ids, unit vectors) of its non-special tokens: last hidden state, through
    `projection` (out, in) when given, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for text in texts:
        batch = tokenizer([text], return_tensors="pt", return_special_tokens_mask=True, truncation=True, max_length=256)
        special = batch.pop("special_tokens_mask")[0].numpy().astype(bool)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state[0].numpy().astype(np.float64)
        if projection is not None:
            hidden = hidden @ projection.T.astype(np.float64)
        hidden = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
        out.append((batch["input_ids"][0].numpy()[~special], hidden[~special]))
    return out


def maxsim_reference(query: np.ndarray, documents: list[np.ndarray]) -> np.ndarray:
    return np.array([float((query @ d.T).max(axis=1).sum()) for d in documents])


def colbert_projection(folder: Path) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(str(folder / "1_Dense" / "model.safetensors"))["linear.weight"].numpy()


# --- one Triton (MiniLM's token twin + both exports) and one gateway -----------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("sparse_multivector")
    repository = base / "repository"
    repository.mkdir()
    (repository / "minilm_tokens").symlink_to(MODEL_REPOSITORY / "minilm_tokens", target_is_directory=True)
    folders = {SPLADE: build_tiny_splade(base / "splade_hf"), COLBERT: build_tiny_colbert(base / "colbert_hf")}
    scripts = {SPLADE: "export_sparse.py", COLBERT: "export_multivector.py"}
    for name, folder in folders.items():
        export = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / scripts[name]), "--hf-folder", str(folder), "--out", str(repository / name)],
            capture_output=True, text=True,
        )
        if export.returncode != 0:
            pytest.fail(f"{scripts[name]} failed ({export.returncode}):\n{export.stderr[-4000:]}")
    triton = TritonServer(repository, ["minilm_tokens", SPLADE, COLBERT], TritonPorts(free_port(), free_port(), free_port()), base)
    triton.start()
    try:
        triton.wait_ready(180)
        http_port = free_port()
        gateway = GatewayProcess(
            triton.grpc_url, ["minilm_tokens"], base / "gateway.log",
            "--embedding-models", f"{SPLADE}={repository / SPLADE},{COLBERT}={repository / COLBERT}",
            "--http-port", str(http_port),
        ).wait_serving(timeout=120)
        try:
            with grpc.insecure_channel(gateway.address) as channel:
                yield {"channel": channel, "folders": folders, "http": f"http://127.0.0.1:{http_port}", "address": gateway.address}
        finally:
            gateway.stop()
    finally:
        triton.stop()


def _embed(served, **fields) -> embed_pb2.EmbedResponse:
    return embed_pb2_grpc.EmbedStub(served["channel"]).Embed(embed_pb2.EmbedRequest(**fields), timeout=60)


def _rerank(served, **fields) -> rerank_pb2.RerankResponse:
    return rerank_pb2_grpc.RerankStub(served["channel"]).Rerank(rerank_pb2.RerankRequest(**fields), timeout=60)


def _invalid(call, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    for word in words:
        assert word in error.value.details(), error.value.details()


# --- sparse ------------------------------------------------------------------------------


def test_sparse_top_k_matches_transformers(served):
    want = splade_reference(served["folders"][SPLADE], TEXTS)
    response = _embed(served, model=SPLADE, inputs=TEXTS, sparse_top_k=25)
    assert not response.embeddings and len(response.sparse_embeddings) == len(TEXTS)
    for row, sparse in zip(want, response.sparse_embeddings):
        top = np.lexsort((np.arange(row.size), -row))[:25]
        assert list(sparse.indices) == top.tolist()
        np.testing.assert_allclose(np.array(sparse.values), row[top], atol=1e-4, rtol=0)


def test_sparse_default_and_threshold(served):
    want = splade_reference(served["folders"][SPLADE], TEXTS)
    everything = _embed(served, model=SPLADE, inputs=TEXTS)
    cut = _embed(served, model=SPLADE, inputs=TEXTS, sparse_threshold=0.5)
    for row, full, above in zip(want, everything.sparse_embeddings, cut.sparse_embeddings):
        # Default: every non-zero weight (a weight within 1e-4 of 0 may fall either side).
        assert set(full.indices) >= set(np.flatnonzero(row > 1e-4).tolist())
        assert set(full.indices) <= set(np.flatnonzero(row > 0).tolist()) | set(np.flatnonzero(row > -1e-4).tolist())
        values = np.array(full.values)
        assert np.all(values > 0) and np.all(np.diff(values) <= 0)  # largest first
        np.testing.assert_allclose(values, row[list(full.indices)], atol=1e-4, rtol=0)
        assert np.all(np.array(above.values) > 0.5)
        clear = lambda r: set(np.flatnonzero(r > 0.5 + 1e-4).tolist())  # noqa: E731
        assert clear(row) <= set(above.indices) <= set(np.flatnonzero(row > 0.5 - 1e-4).tolist())


def test_sparse_bad_requests_are_invalid_argument(served):
    _invalid(lambda: _embed(served, model=SPLADE, inputs=["a"], sparse_top_k=0), "sparse_top_k", "at least 1")
    _invalid(lambda: _embed(served, model=SPLADE, inputs=["a"], sparse_threshold=-1.0), "sparse_threshold")
    _invalid(lambda: _embed(served, model=SPLADE, inputs=["a"], dimensions=8), "dimensions", "sparse")
    _invalid(lambda: _embed(served, model=SPLADE, inputs=["a"], encoding=embed_pb2.EMBEDDING_ENCODING_INT8), "EMBEDDING_ENCODING_INT8")
    _invalid(lambda: _embed(served, model=COLBERT, inputs=["a"], sparse_top_k=5), "sparse_top_k is for sparse models")


# --- multi-vector --------------------------------------------------------------------------


def test_token_vectors_match_transformers(served):
    folder = served["folders"][COLBERT]
    want = token_reference(folder, TEXTS, colbert_projection(folder))
    response = _embed(served, model=COLBERT, inputs=TEXTS)
    assert not response.embeddings and len(response.multi_vector_embeddings) == len(TEXTS)
    for (ids, vectors), got in zip(want, response.multi_vector_embeddings):
        assert list(got.token_ids) == ids.tolist()
        values = np.array([v.values for v in got.vectors])
        assert values.shape == (len(ids), PROJECTED)
        np.testing.assert_allclose(values, vectors, atol=1e-4, rtol=0)


def test_maxsim_rerank_matches_direct_computation(served):
    folder = served["folders"][COLBERT]
    vectors = token_reference(folder, [QUERY, *DOCUMENTS], colbert_projection(folder))
    want = maxsim_reference(vectors[0][1], [v for _, v in vectors[1:]])
    response = _rerank(served, model=f"{COLBERT}-maxsim", query=QUERY, documents=DOCUMENTS, raw_scores=True)
    got = {r.index: r for r in response.results}
    np.testing.assert_allclose([got[i].raw_score for i in range(len(DOCUMENTS))], want, atol=1e-4, rtol=0)
    relevance = (want / len(vectors[0][0]) + 1) / 2
    np.testing.assert_allclose([got[i].relevance_score for i in range(len(DOCUMENTS))], relevance, atol=1e-5, rtol=0)
    assert [r.index for r in response.results] == np.argsort(-relevance, kind="stable").tolist()


def test_builtin_minilm_maxsim_is_served_and_matches_direct_computation(served):
    from reference import MINILM_DIR as minilm

    models = models_pb2_grpc.ModelsStub(served["channel"]).ListModels(models_pb2.ListModelsRequest(), timeout=30).models
    kinds = {m.name: m.kind for m in models}
    assert kinds["all-minilm-l6-v2-maxsim"] == models_pb2.MODEL_KIND_MAXSIM
    assert kinds["all-minilm-l6-v2-tokens"] == models_pb2.MODEL_KIND_EMBEDDING
    outputs = {m.name: m.embedding_output for m in models if m.kind == models_pb2.MODEL_KIND_EMBEDDING}
    assert outputs == {
        "all-minilm-l6-v2-tokens": models_pb2.EMBEDDING_OUTPUT_MULTI_VECTOR,
        COLBERT: models_pb2.EMBEDDING_OUTPUT_MULTI_VECTOR,
        SPLADE: models_pb2.EMBEDDING_OUTPUT_SPARSE,
    }
    vectors = token_reference(minilm, [QUERY, *DOCUMENTS], None)
    want = maxsim_reference(vectors[0][1], [v for _, v in vectors[1:]])
    response = _rerank(served, model="all-minilm-l6-v2-maxsim", query=QUERY, documents=DOCUMENTS, raw_scores=True)
    got = {r.index: r.raw_score for r in response.results}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], want, atol=1e-4, rtol=0)
    tokens = _embed(served, model="all-minilm-l6-v2-tokens", inputs=[QUERY]).multi_vector_embeddings[0]
    np.testing.assert_allclose(np.array([v.values for v in tokens.vectors]), vectors[0][1], atol=1e-4, rtol=0)


def test_maxsim_over_http_rerank(served):
    import httpx

    body = {"model": "all-minilm-l6-v2-maxsim", "query": QUERY, "documents": DOCUMENTS}
    reply = httpx.post(f"{served['http']}/v1/rerank", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    grpc_order = [r.index for r in _rerank(served, model="all-minilm-l6-v2-maxsim", query=QUERY, documents=DOCUMENTS).results]
    assert [r["index"] for r in reply.json()["results"]] == grpc_order
    # OpenAI's embeddings shape has no room for sparse or per-token vectors: a clear 400.
    reply = httpx.post(f"{served['http']}/v1/embeddings", json={"model": SPLADE, "input": ["a"]}, timeout=60)
    assert reply.status_code == 400 and "gRPC" in reply.text


def test_sdk_results_carry_sparse_and_token_vectors(served):
    import ragserve

    folder = served["folders"][COLBERT]
    with ragserve.Client(served["address"]) as client:
        sparse = client.embed(TEXTS[:2], model=SPLADE, sparse_top_k=5)  # the SDK's default encoding: float32 bytes
        tokens = client.embed(TEXTS[:2], model=COLBERT)
        infos = {m.name: m for m in client.list_models()}
    want = splade_reference(served["folders"][SPLADE], TEXTS[:2])
    for row, got in zip(want, sparse.sparse):
        top = np.lexsort((np.arange(row.size), -row))[:5]
        assert got.indices.tolist() == top.tolist() and got.indices.dtype == np.uint32
        np.testing.assert_allclose(got.values, row[top], atol=1e-4, rtol=0)
    assert sparse.token_embeddings is None and sparse.embeddings.size == 0
    for (ids, vectors), got, got_ids in zip(token_reference(folder, TEXTS[:2], colbert_projection(folder)), tokens.token_embeddings, tokens.token_ids):
        assert got_ids.tolist() == ids.tolist()
        np.testing.assert_allclose(got, vectors, atol=1e-4, rtol=0)
    assert (infos[SPLADE].embedding_output, infos[COLBERT].embedding_output) == ("sparse", "multi_vector")
    assert infos[f"{COLBERT}-maxsim"].kind == "maxsim"
