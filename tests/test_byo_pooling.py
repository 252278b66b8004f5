"""Bring-your-own embedding models, without Triton: the pooling arithmetic against
sentence-transformers' own Pooling, what scripts/export_encoder.py reads from a folder and what
it refuses, its self-check catching a wrong pooling, and the PyTorch (GPU variant) template
pooling as the folder says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from byo_models import MINILM_DIR, reference, st_bert, st_decoder
from support import ROOT, BackendRequest, load_template

sys.path.insert(0, str(ROOT / "scripts"))
import export_encoder  # noqa: E402

from ragserve_server.models.registry import CLS, EMBEDDING, GPU, LAST_TOKEN, MAX, MEAN, TORCH_CUDA, encoder_spec  # noqa: E402

ST_MODES = {"mean": MEAN, "cls": CLS, "max": MAX, "lasttoken": LAST_TOKEN, "mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}


def _masks(side: str) -> torch.Tensor:
    lengths = [7, 4, 1]
    mask = torch.zeros(3, 7, dtype=torch.int64)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 7 - n :] = 1
    return mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("st_mode", list(ST_MODES))
def test_pooling_equals_sentence_transformers_pooling_on_either_padding_side(monkeypatch, st_mode, side):
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)
    mask = _masks(side)
    want = Pooling(16, pooling_mode=st_mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    template = load_template(monkeypatch, "torch_encoder_model.py")
    for pool in (export_encoder.pool, template.pool):
        got = pool(hidden, mask, ST_MODES[st_mode])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _st_folder(tmp_path: Path, modules: list[str], pooling: dict | None = None, prompts: dict | None = None) -> Path:
    folder = tmp_path / "st"
    folder.mkdir()
    entries = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for index, kind in enumerate(modules, start=1):
        entries.append({"idx": index, "name": str(index), "path": f"{index}_{kind}", "type": f"sentence_transformers.models.{kind}"})
        (folder / f"{index}_{kind}").mkdir()
    (folder / "modules.json").write_text(json.dumps(entries))
    if pooling is not None:
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if prompts:
        (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts, "default_prompt_name": None}))
    return folder


def test_the_recipe_is_read_from_the_folder():
    recipe = export_encoder.read_recipe(MINILM_DIR, None, None)  # legacy boolean keys, a Normalize module
    assert (recipe.pooling, recipe.normalize, recipe.hf_dir) == (MEAN, True, MINILM_DIR)


def test_new_and_legacy_pooling_configs(tmp_path):
    folder = _st_folder(tmp_path, ["Pooling"], {"embedding_dimension": 8, "pooling_mode": "lasttoken"})
    assert (export_encoder.read_recipe(folder, None, None).pooling, export_encoder.read_recipe(folder, None, None).normalize) == (
        LAST_TOKEN,
        False,
    )
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert export_encoder.read_recipe(folder, None, None).pooling == CLS


@pytest.mark.parametrize(
    ("modules", "pooling", "prompts", "flags", "message"),
    [
        (["Pooling"], {"pooling_mode": "weightedmean"}, None, (None, None), "pooling mode 'weightedmean' is not supported"),
        (["Pooling"], {"pooling_mode": ["cls", "mean"]}, None, (None, None), "concatenated poolings are not supported"),
        (["Pooling"], {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}, None, (None, None), "concatenated"),
        (["Pooling", "Dense", "Normalize"], {"pooling_mode": "mean"}, None, (None, None), "Dense"),
        (["Pooling", "LayerNorm"], {"pooling_mode": "mean"}, None, (None, None), "LayerNorm"),
        (["Pooling"], {"pooling_mode": "mean", "include_prompt": False}, {"query": "q: "}, (None, None), "include_prompt is false"),
        (["Pooling"], {"pooling_mode": "cls"}, None, ("mean", None), "--pooling mean contradicts"),
        (["Pooling"], {"pooling_mode": "cls"}, None, (None, True), "--normalize=True contradicts"),
    ],
)
def test_what_the_graph_cannot_reproduce_is_refused(tmp_path, modules, pooling, prompts, flags, message):
    folder = _st_folder(tmp_path, modules, pooling, prompts)
    with pytest.raises(export_encoder.Refused, match="not exported|contradicts") as refused:
        export_encoder.read_recipe(folder, *flags)
    assert message in str(refused.value)


def test_a_plain_folder_needs_its_pooling_named(tmp_path):
    with pytest.raises(export_encoder.Refused, match="no sentence-transformers modules.json: say how the model pools with --pooling"):
        export_encoder.read_recipe(tmp_path, None, None)
    recipe = export_encoder.read_recipe(tmp_path, LAST_TOKEN, True)
    assert (recipe.pooling, recipe.normalize, recipe.sentence_transformers) == (LAST_TOKEN, True, False)


def test_the_script_refuses_weighted_mean_and_writes_nothing(tmp_path):
    folder = st_bert(tmp_path / "weighted", "weightedmean", normalize=False)
    out = tmp_path / "repo" / "weighted"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_encoder.py"), "--hf-folder", str(folder), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode != 0
    assert "pooling mode 'weightedmean' is not supported" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_the_self_check_catches_a_graph_that_pools_otherwise(tmp_path):
    """Today's bug: a CLS folder exported mean-pooled. The check compares with sentence-transformers
    itself, so the wrong graph is refused (it compared with its own re-implementation before)."""
    folder = st_bert(tmp_path / "cls", "cls", normalize=True)
    recipe = export_encoder.read_recipe(folder, None, None)
    model = export_encoder.load(recipe.hf_dir, MEAN, recipe.normalize)  # not what the folder says
    onnx_path = tmp_path / "mean.onnx"
    export_encoder.export_onnx(model, onnx_path)
    st = export_encoder.reference_model(folder, recipe)
    with pytest.raises(export_encoder.Refused, match="differs from sentence-transformers' encode") as refused:
        export_encoder.check(st, folder, recipe, recipe.hf_dir, onnx_path, 64, {})
    assert "cosine" in str(refused.value)


TEXTS = ["the capital of France", "Paris is the capital and largest city of France. " * 3, "a"]


@pytest.mark.parametrize("kind", ["bert-max", "decoder"])
def test_the_pytorch_template_pools_as_the_folder_says(tmp_path, monkeypatch, kind):
    """The GPU variant (PyTorch in the python backend), run here on the CPU: head `embedding`
    with the registry's pooling and normalisation equals sentence-transformers."""
    from google.protobuf import json_format

    from ragserve_server.encoding.tokenization import TRUNCATE_END, EncoderTokenizer
    from ragserve_server.models import model_config
    from ragserve_server.models.model_config import TensorSpec
    from ragserve_server.models.repository import render_repository

    folder = st_bert(tmp_path / "st", "max", normalize=False) if kind == "bert-max" else st_decoder(tmp_path / "st")
    recipe = export_encoder.read_recipe(folder, None, None)
    spec = encoder_spec(
        name="m", kind=EMBEDDING, triton_model="m", tokenizer_dir=folder, max_input_tokens=64,
        output=TensorSpec("embedding", "TYPE_FP32", (32,)), dimensions=32, pooling=recipe.pooling, normalize=recipe.normalize,
    )
    render_repository([spec], GPU, tmp_path / "repo", encoder_backend=TORCH_CUDA)
    config = model_config.read(tmp_path / "repo" / "m" / "config.pbtxt")
    assert model_config.parameters_of(config)["head"] == "embedding"
    template = load_template(monkeypatch, "torch_encoder_model.py")
    model = template.TritonPythonModel()
    model.initialize({
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(tmp_path / "repo" / "m"), "model_version": "1", "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
    })
    tokenizer = EncoderTokenizer(folder / "tokenizer.json", 64)
    sequences = tokenizer.encode(TEXTS, TRUNCATE_END)
    batch = tokenizer.pad(sequences, 32)
    (response,) = model.execute([BackendRequest(input_ids=batch.input_ids, attention_mask=batch.attention_mask)])
    got = response[0].array
    want = reference(folder).encode(TEXTS, convert_to_numpy=True)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)


def test_left_padding_puts_the_tokens_at_the_end():
    from ragserve_server.encoding.tokenization import EncoderTokenizer

    tokenizer = EncoderTokenizer(MINILM_DIR / "tokenizer.json", 16)
    batch = tokenizer.pad([[101, 7, 102], [101, 102]], 4, side="left")
    assert batch.input_ids.tolist() == [[0, 101, 7, 102], [0, 0, 101, 102]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]


def test_a_default_prompt_and_prompts_become_prefixes_checked_against_sentence_transformers(tmp_path):
    """sentence-transformers applies `default_prompt_name`'s prompt to every text given without
    one: the entry's prefix for no input type, which the export's check compares with encode."""
    from sentence_transformers import SentenceTransformer

    from ragserve_server.models.manifest import exported_spec

    folder = st_bert(tmp_path / "st", "cls", normalize=True, prompts={"query": "query: ", "document": "doc: ", "classify": "cls: "})
    st = SentenceTransformer(str(folder), device="cpu")
    st.default_prompt_name = "classify"
    st.save(str(folder))
    export_encoder.export(folder, tmp_path / "repo" / "dflt", name="dflt", cores=1)
    spec = exported_spec(tmp_path / "repo" / "dflt")
    assert dict(spec.prefixes) == {"query": "query: ", "passage": "doc: ", "": "cls: "}
    assert (spec.pooling, spec.normalize, spec.padding_side) == (CLS, True, "right")
