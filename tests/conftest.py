"""Shared fixtures: one real Triton and one real gateway process for the integration tests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import MODEL_REPOSITORY, ROOT, GatewayProcess, start_triton


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    """A temporary copy of the model repository (its entries linked, not copied): tests add
    models to it, never to the real one."""
    repository = tmp_path_factory.mktemp("model_repository")
    for entry in MODEL_REPOSITORY.iterdir():
        if entry.is_dir():
            (repository / entry.name).symlink_to(entry, target_is_directory=True)
    return repository


@pytest.fixture(scope="session")
def triton(tmp_path_factory, model_repository):
    server = start_triton(tmp_path_factory.mktemp("triton"), ["minilm"], model_repository)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory):
    process = GatewayProcess(triton.grpc_url, triton.models, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield process.wait_serving()
    process.stop()


@dataclass(frozen=True)
class CrossEncoder:
    name: str  # the gateway's model name
    hf_folder: Path  # the checkpoint, for in-process references
    model_dir: Path  # its entry in the session's model repository


@pytest.fixture(scope="session")
def cross_encoder(triton, model_repository, tmp_path_factory) -> CrossEncoder:
    """A cross-encoder checkpoint built at test time, exported with scripts/export_cross_encoder.py
    into the temporary model repository and loaded into the session Triton."""
    import tritonclient.grpc as triton_grpc

    from reference import build_test_cross_encoder

    hf_folder = build_test_cross_encoder(tmp_path_factory.mktemp("cross_encoder_hf"))
    model_dir = model_repository / "test-cross-encoder"
    export = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_cross_encoder.py"), "--hf-folder", str(hf_folder), "--out", str(model_dir)],
        capture_output=True,
        text=True,
    )
    if export.returncode != 0:
        pytest.fail(f"export_cross_encoder.py failed ({export.returncode}):\n{export.stderr[-4000:]}")
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    client.load_model(model_dir.name)  # explicit model control: the repository is scanned on load
    assert client.is_model_ready(model_dir.name)
    return CrossEncoder("test-cross-encoder", hf_folder, model_dir)


@pytest.fixture(scope="session")
def rerank_gateway(triton, cross_encoder, tmp_path_factory):
    """A gateway serving the embedded default plus the test cross-encoder (--cross-encoders)."""
    process = GatewayProcess(
        triton.grpc_url,
        triton.models,
        tmp_path_factory.mktemp("rerank_gateway") / "gateway.log",
        "--cross-encoders", f"{cross_encoder.name}={cross_encoder.model_dir}",
    )
    yield process.wait_serving()
    process.stop()


SMOLLM2_HF = MODEL_REPOSITORY / "smollm2" / "1" / "hf"
GREEDY_MAX_TOKENS = 20  # the `reference` fixture's default, test_generate_e2e's MAX_TOKENS


@pytest.fixture(scope="module")  # a torch model: held by one module at a time
def reference():
    """transformers' own greedy generate on SmolLM2's folder: (text, completion tokens) of a chat."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_HF)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HF, dtype=torch.float32).eval()

    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)

    def greedy(messages, max_new_tokens=GREEDY_MAX_TOKENS):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on a loaded 2-core machine one thread is several times faster here
        try:
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            torch.set_num_threads(threads)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        if new and new[-1] in eos:  # the end id ends the sequence; it is not returned (TensorRT-LLM's contract)
            new = new[:-1]
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    return greedy


# --- the `integration` marker, checked both ways: a test that starts a real Triton or gateway
# (itself or through a fixture) carries it, and a test that carries it does so ---

_RUNNING: list = [None]  # the test being set up, run or torn down
_FIXTURES: list[str] = []  # the fixtures being set up now, innermost last
_STARTING_FIXTURES: set[str] = set()  # fixtures that started a Triton or gateway
_STARTED_BY: set[str] = set()  # tests that started one in their own body


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING[0] = item
    try:
        yield
    finally:
        _RUNNING[0] = None


class _FixtureStack:
    """Registered as a plugin of its own: a conftest's pytest_fixture_setup is not called for
    session-scoped fixtures (their node, the session, is above this folder)."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        _FIXTURES.append(fixturedef.argname)
        try:
            yield
        finally:
            _FIXTURES.pop()


def pytest_configure(config):
    config.pluginmanager.register(_FixtureStack(), "ragserve-fixture-stack")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.passed or item.get_closest_marker("integration") is None:
        return
    if item.nodeid in _STARTED_BY or _STARTING_FIXTURES & set(getattr(item, "fixturenames", ())):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} is marked `integration` but starts no Triton or gateway, itself or through "
        "a fixture: take the marker off (or start the process through a fixture or subprocess)"
        f" [its fixtures: {sorted(getattr(item, 'fixturenames', ()))}; fixtures seen starting one: {sorted(_STARTING_FIXTURES)}]"
    )


def _starts_a_server(args) -> str | None:
    """What `args` starts, when it is a Triton or a gateway process (`python -m ragserve_server`)."""
    words = [str(a) for a in ([args] if isinstance(args, (str, bytes, Path)) else args)]
    if len(words) == 1:
        words = words[0].split()
    for index, word in enumerate(words):
        if Path(word).name == "tritonserver":
            return "Triton"
        if word == "-m" and index + 1 < len(words) and words[index + 1] == "ragserve_server":
            return "a gateway"
    return None


_popen_init = subprocess.Popen.__init__


def _checked_popen_init(self, args, *rest, **kwargs):
    item = _RUNNING[0]
    started = _starts_a_server(args)
    if started and item is not None:
        if item.get_closest_marker("integration") is None:
            pytest.fail(
                f"{item.nodeid} starts {started} but is not marked `integration` "
                "(add @pytest.mark.integration or a module-level pytestmark)",
                pytrace=False,
            )
        if _FIXTURES:
            _STARTING_FIXTURES.update(_FIXTURES)
        else:
            _STARTED_BY.add(item.nodeid)
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _checked_popen_init
