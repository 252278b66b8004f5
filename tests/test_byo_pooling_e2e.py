"""Bring-your-own embedding models end to end: small models made at test time (sentence-
transformers BERT folders pooled by CLS + Normalize, mean, max; a Qwen3-Embedding-style decoder
folder; a plain transformers Llama folder with its pooling given by flags), exported with
scripts/export_encoder.py, loaded into one Triton, served by one gateway through
`--embedding-models` alone. What comes back equals sentence-transformers' encode of the same
folder: cosine >= 0.9999 and the same length (normalize=false gives the model's own vectors)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from byo_models import QWEN3_QUERY_PROMPT, decoder_hf, reference, st_bert, st_decoder
from support import ROOT, GatewayProcess

pytestmark = pytest.mark.integration

LLAMA_QUERY_PROMPT = "Instruct: Find the passage that answers the question\nQuery: "
TEXTS = [
    "what is the capital of france?",
    "Paris is the capital and largest city of France, with an estimated population of two million. " * 3,
    "a",
    "Ünïcödé, emoji 🙂 and numbers 1234",
]


@dataclass(frozen=True)
class Brought:
    name: str  # served name
    folder: Path  # what the user brought
    st_args: dict  # reference(folder, **st_args)
    pooling: str  # ModelInfo.pooling as the SDK names it
    normalized: bool
    query_prefix: str = ""
    suffix: str = ""  # what the reference appends to each text (the export's --append-eos)


def _models(root: Path) -> list[tuple[Brought, list[str]]]:
    """(model, extra export flags) for each family."""
    return [
        (Brought("bge-style-cls", st_bert(root / "cls", "cls", normalize=True, prompts={"query": "query: ", "passage": "passage: "}),
                 {}, "cls", True, "query: "), []),
        (Brought("mean-unnormalised", st_bert(root / "mean", "mean", normalize=False, seed=1), {}, "mean", False), []),
        (Brought("max-pooled", st_bert(root / "max", "max", normalize=False, seed=2), {}, "max", False), []),
        (Brought("qwen3-style", st_decoder(root / "qwen3"), {}, "last_token", True, QWEN3_QUERY_PROMPT), []),
        (
            Brought(
                "llama-plain", decoder_hf(root / "llama", family="llama", append_eos=False, seed=3),
                {"pooling_mode": "lasttoken", "normalize": True, "prompts": {"query": LLAMA_QUERY_PROMPT}},
                "last_token", True, LLAMA_QUERY_PROMPT, suffix="<|endoftext|>",
            ),
            ["--pooling", "last_token", "--normalize", "--append-eos", "--prompt", f"query={LLAMA_QUERY_PROMPT}"],
        ),
    ]


@pytest.fixture(scope="module")
def brought(triton, model_repository, tmp_path_factory):
    """Every model exported into the session's model repository and loaded into its Triton;
    one gateway serves them all beside the built-in MiniLM."""
    import subprocess

    import tritonclient.grpc as triton_grpc

    root = tmp_path_factory.mktemp("byo")
    models = _models(root)
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    served = []
    for model, flags in models:
        out = model_repository / f"byo-{model.name}"
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "export_encoder.py"), "--hf-folder", str(model.folder), "--out", str(out),
             "--name", model.name, "--cores", "1", "--max-batch", "8", *flags],
            capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        client.load_model(out.name)
        served.append(f"{model.name}={out}")
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, root / "gateway.log", "--embedding-models", ",".join(served)
    ).wait_serving(timeout=120)
    yield gateway, [m for m, _ in models], {m.name: model_repository / f"byo-{m.name}" for m, _ in models}
    gateway.stop()


def _compare(got: np.ndarray, want: np.ndarray) -> None:
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-3)


def test_every_family_equals_sentence_transformers(brought):
    import ragserve

    gateway, models, _ = brought
    with ragserve.Client(gateway.address, timeout=60) as client:
        for model in models:
            st = reference(model.folder, **model.st_args)
            got = client.embed(TEXTS, model=model.name, normalize=False).embeddings
            _compare(np.asarray(got), st.encode([t + model.suffix for t in TEXTS], convert_to_numpy=True))
            if model.normalized:  # the model's own Normalize: unit vectors even with normalize=false
                np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
            query = client.embed(TEXTS[:2], model=model.name, input_type="query").embeddings
            want = st.encode([t + model.suffix for t in TEXTS[:2]], prompt=model.query_prefix, normalize_embeddings=True)
            _compare(np.asarray(query), want)


def test_a_truncated_text_equals_sentence_transformers_at_the_limit(brought):
    """Over the limit, truncate=end cuts where sentence-transformers cuts; a decoder's end token
    stays last (for --append-eos: sentence-transformers on the exported tokenizer, which appends it)."""
    import ragserve

    gateway, models, exported = brought
    long = " ".join(["the tokens go on and on"] * 120)
    with ragserve.Client(gateway.address, timeout=60) as client:
        for model in models:
            st = reference(exported[model.name] / "hf" if model.suffix else model.folder, **model.st_args)
            got = client.embed([long], model=model.name, normalize=False, truncate="end").embeddings
            _compare(np.asarray(got), st.encode([long], convert_to_numpy=True))


def test_list_models_says_how_each_model_pools_normalises_and_prompts(brought):
    import ragserve

    gateway, models, _ = brought
    with ragserve.Client(gateway.address, timeout=30) as client:
        infos = {m.name: m for m in client.list_models()}
    for model in models:
        info = infos[model.name]
        assert (info.pooling, info.normalized_by_model, info.dimensions) == (model.pooling, model.normalized, 32), model.name
        assert info.input_types["query"] == model.query_prefix
    minilm = infos["all-minilm-l6-v2"]
    assert (minilm.pooling, minilm.normalized_by_model) == ("mean", False)  # as before: the gateway normalises
