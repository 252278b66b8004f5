"""Rerank pieces that need no Triton: settings parsing, catalog defaults, token limits,
the exported model template, model discovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ragserve_server.models.catalog import BI_ENCODER, CROSS_ENCODER, build_catalog, max_tokens_of
from ragserve_server.models.model_config import TensorSpec
from ragserve_server.models.registry import encoder_spec
from ragserve_server.models.manifest import exported_spec, parse_named_folders, write_manifest
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.errors import InvalidInput
from ragserve_server.encoding.tokenization import TRUNCATE_END, TRUNCATE_NONE, EncoderTokenizer
from reference import MINILM_DIR
from support import ROOT


def test_builtin_ort_models_run_the_template_itself():
    """The built-in ONNX models' model.py are links to the template (git holds no copies)."""
    template = (ROOT / "scripts" / "templates" / "ort_model.py").resolve()
    for model in ("minilm", "minilm_tokens"):
        model_py = ROOT / "model_repository" / model / "1" / "model.py"
        assert model_py.is_symlink() and model_py.resolve() == template, model_py


def test_parse_named_folders(tmp_path):
    assert parse_named_folders("", "--cross-encoders") == {}
    assert parse_named_folders(f" a={tmp_path}/x , b=rel/y ", "--cross-encoders") == {"a": tmp_path / "x", "b": Path("rel/y")}
    for bad in ("a", "=x", "a=", "a=x,a=y"):
        with pytest.raises(ValueError, match="--cross-encoders"):
            parse_named_folders(bad, "--cross-encoders")


@pytest.fixture
def exported(tmp_path):
    """An exported cross-encoder's registry entry and tokenizer files (no ONNX needed here)."""
    model_dir = tmp_path / "my-ce"
    (model_dir / "hf").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(MINILM_DIR / name, model_dir / "hf" / name)
    spec = encoder_spec(
        name="my-ce", kind=CROSS_ENCODER, triton_model="my-ce", tokenizer_dir=model_dir / "hf", max_input_tokens=512,
        output=TensorSpec("logits", "TYPE_FP32", (1,)), token_types=True,
    )
    write_manifest(spec, model_dir)
    return model_dir


def test_catalog_default_reranker_is_the_bi_encoder(exported):
    catalog = build_catalog([minilm_spec(), exported_spec(exported, name="ce", kind=CROSS_ENCODER)], max_inputs_per_call=8)
    assert catalog.get("", (BI_ENCODER, CROSS_ENCODER)).name == "all-minilm-l6-v2-bi-encoder"
    ce = catalog.get("ce", (BI_ENCODER, CROSS_ENCODER))
    assert (ce.kind, ce.triton_model, ce.max_input_tokens, ce.max_batch, ce.rows_per_request) == (CROSS_ENCODER, "my-ce", 512, 1000, 64)
    assert ce.model_dir == exported / "hf"
    bi = catalog.get("all-minilm-l6-v2-bi-encoder", (BI_ENCODER,))
    assert (bi.triton_model, bi.embedding_model, bi.max_input_tokens) == ("minilm", "all-minilm-l6-v2", 256)


def test_catalog_default_reranker_can_be_a_cross_encoder(exported):
    ce = exported_spec(exported, name="ce")
    catalog = build_catalog([minilm_spec(), ce], default_reranker="ce")
    assert catalog.get("", (BI_ENCODER, CROSS_ENCODER)).name == "ce"
    assert sorted(catalog.defaults.values()) == ["all-minilm-l6-v2", "ce"]  # one default reranker
    with pytest.raises(ValueError, match="not a served reranker"):
        build_catalog([minilm_spec()], default_reranker="nope")
    with pytest.raises(ValueError, match="given twice"):
        build_catalog([minilm_spec(), ce, ce])


def test_exported_spec_refuses_what_is_not_an_exported_model(exported):
    with pytest.raises(ValueError, match="not an exported model"):
        exported_spec(exported.parent)
    with pytest.raises(ValueError, match="is a cross_encoder model, not a embedding model"):
        exported_spec(exported, kind="embedding")
    renamed = exported.parent / "other-name"
    exported.rename(renamed)
    with pytest.raises(ValueError, match="Triton names models by folder"):
        exported_spec(renamed)


def test_max_tokens_of(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlm-roberta", "max_position_embeddings": 514}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert max_tokens_of(tmp_path) == 512
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    assert max_tokens_of(tmp_path) == 256


def test_query_limits_leave_room_for_the_document():
    tokenizer = EncoderTokenizer(MINILM_DIR / "tokenizer.json", 20)
    ok, too_long = " ".join(["w"] * 16), " ".join(["w"] * 17)  # 18 and 19 tokens with [CLS] [SEP]
    assert tokenizer.check_query(ok, paired=True) == 18
    with pytest.raises(InvalidInput, match="query has 19 tokens, more than the 18 allowed"):
        tokenizer.check_query(too_long, paired=True)
    assert tokenizer.check_query(too_long, paired=False) == 19
    # Paired, the document alone is cut, keeping one token; the pair fits exactly.
    (pair,) = tokenizer.encode_pairs(ok, ["x y z"], TRUNCATE_END)
    assert len(pair.ids) == 20 and pair.type_ids.count(1) == 2
    with pytest.raises(InvalidInput, match="document 1 with the query has 22 tokens, more than the model's limit of 20"):
        tokenizer.encode_pairs(ok, ["", "x y z"], TRUNCATE_NONE)


def test_counts_are_not_cut_at_the_files_truncation():
    tokenizer = EncoderTokenizer(MINILM_DIR / "tokenizer.json", 256)
    assert tokenizer.count(" ".join(["w"] * 300)) == 302
