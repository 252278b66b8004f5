"""The python-backend models with numpy 2 in Triton's stubs.

Triton 2.51's python-backend stub (its pybind11 predates numpy 2) misreads numpy 2 arrays: the
GPU check found Embed returning empty outputs and Generate failing there. So the models pass
tensors as DLPack when the stub's numpy is 2 (`NUMPY_2` in model.py). Our venv pins numpy
1.26; a Triton container or a newer venv brings numpy 2. This starts the bundled Triton from
`.venv/numpy2` (a virtualenv over ours with numpy 2: scripts/make_numpy2_venv.py, built by
`make test`), checks that its stubs loaded numpy 2, and checks Embed and Generate end to end
against the references, while this process keeps numpy 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import ragserve
from reference import cosine_rows, minilm_embeddings
from support import gateway_over, python_backend_stubs, start_triton
from test_generate_e2e import CHATS, MAX_TOKENS

pytestmark = pytest.mark.integration

NUMPY2 = Path(__file__).resolve().parents[1] / ".venv" / "numpy2"
TEXTS = ["hello", "The capital of France is Paris.", "ünïcödé — 東京 is the capital of Japan 🚀", "a " * 40]


@pytest.fixture(scope="module")
def numpy2_stack(tmp_path_factory):
    if not (NUMPY2 / ".installed").exists():
        pytest.fail(f"{NUMPY2} is missing: `make test` builds it (scripts/make_numpy2_venv.py)")
    assert int(np.__version__.split(".")[0]) == 1  # this process: the venv's numpy 1
    work = tmp_path_factory.mktemp("numpy2")
    with pytest.MonkeyPatch.context() as patch:  # the launcher puts this python's folder first on Triton's PATH
        patch.setattr(sys, "executable", str(NUMPY2 / "bin" / "python"))
        triton = start_triton(work, ["minilm", "smollm2"])
    with gateway_over(triton, ["minilm", "smollm2"], work) as gateway:  # the gateway runs our numpy 1
        yield triton, gateway


def test_every_stub_runs_numpy_2(numpy2_stack):
    triton, _ = numpy2_stack
    stubs = python_backend_stubs(triton.process.pid)
    assert stubs
    for pid in stubs:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert f"{NUMPY2}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/numpy/" in maps, f"stub {pid} did not load numpy from {NUMPY2}"


def test_embed_equals_the_reference(numpy2_stack):
    _, gateway = numpy2_stack
    with ragserve.Client(gateway.address, timeout=60) as client:
        alone = client.embed(TEXTS[:1]).embeddings
        together = client.embed(TEXTS).embeddings
    want = minilm_embeddings(TEXTS)
    assert together.shape == want.shape and alone.shape == (1, want.shape[1])
    assert cosine_rows(together, want).min() >= 0.9999
    assert cosine_rows(alone, want[:1]).min() >= 0.9999


async def test_greedy_generate_equals_transformers(numpy2_stack, reference):
    _, gateway = numpy2_stack
    async with ragserve.AsyncClient(gateway.address, timeout=120) as client:
        for messages in CHATS[:2]:
            text, n_tokens = reference(messages)
            result = await client.generate(messages=messages, max_tokens=MAX_TOKENS, temperature=0)
            assert result.text == text and result.usage.completion_tokens == n_tokens
