"""Models as data: the registry, rendered configs, the tensor contract, start-up refusals."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from ragserve_server.models import model_config
from ragserve_server.models.catalog import build_catalog
from ragserve_server.encoding.encoder import EncoderRunner
from ragserve_server.main import StartupError, check_triton_configs
from ragserve_server.backend.replicas import ReplicaSet
from ragserve_server.models.builtin import BUILTIN, minilm_spec
from ragserve_server.models.registry import (
    CPU,
    CROSS_ENCODER,
    DEVICES,
    ENCODER_BACKENDS,
    ONNXRUNTIME,
    TENSORRT,
    encoder_spec,
)
from ragserve_server.models.repository import render_repository, triton_config
from ragserve_server.models.tensorrt_profiles import Profile, check_coverage, profile_plan, required_shapes
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.models.buckets import bucket_length, bucket_widths
from fakes import FakeBackend
from support import MODEL_REPOSITORY, ROOT, GatewayProcess, free_port, start_triton


def builtin():
    """Every built-in entry whose code is importable (all of them once the tree is complete)."""
    return [factory(MODEL_REPOSITORY) for factory in BUILTIN.values()]


def test_every_rendered_config_parses_as_model_config():
    for spec in builtin():
        for variant in spec.variants:
            config = triton_config(spec, variant)
            text = model_config.render(config, "header")
            again = model_config.parse(text)
            assert again == config, (spec.name, variant)
            assert again.name == spec.triton_model and again.max_batch_size == spec.max_batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoder_backend", ENCODER_BACKENDS)
def test_rendered_repositories_parse_and_match_the_registry(tmp_path, device, encoder_backend):
    specs = builtin()
    rendered = render_repository(specs, device, tmp_path, encoder_backend=encoder_backend)
    for spec in specs:
        config = model_config.read(tmp_path / spec.triton_model / "config.pbtxt")
        assert model_config.mismatches(spec.triton_model, spec.max_batch, spec.inputs, spec.outputs, config) == []
        gpu = config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert gpu == (device != CPU)
        assert rendered[spec.triton_model] == spec.variant_for(device, encoder_backend)
    if device != CPU and encoder_backend == TENSORRT:
        minilm = model_config.read(tmp_path / "minilm" / "config.pbtxt")
        assert minilm.platform == "tensorrt_plan"
        assert not minilm.dynamic_batching.preferred_batch_size  # a batch takes every queued row (issue 24)
        assert minilm.dynamic_batching.default_queue_policy.max_queue_size > 0


def test_committed_cpu_configs_are_rendered_from_the_registry():
    for spec in builtin():
        committed = model_config.read(MODEL_REPOSITORY / spec.triton_model / "config.pbtxt")
        assert committed == triton_config(spec, ONNXRUNTIME), f"{spec.triton_model}: run `make configs`"


def assert_matches_config(inputs: dict[str, np.ndarray], config: model_config_pb2.ModelConfig) -> None:
    declared = {t.name: t for t in config.input}
    assert set(inputs) <= set(declared)
    assert {n for n, t in declared.items() if not t.optional} <= set(inputs)
    for name, array in inputs.items():
        tensor = declared[name]
        assert array.dtype == model_config.NUMPY_DTYPES[model_config_pb2.DataType.Name(tensor.data_type)], name
        assert 1 <= array.shape[0] <= config.max_batch_size, name
        assert len(array.shape[1:]) == len(tensor.dims)
        assert all(d == -1 or d == s for d, s in zip(tensor.dims, array.shape[1:])), name


@pytest.mark.parametrize("kind", ["embedding", CROSS_ENCODER])
async def test_encoder_requests_match_the_config(kind):
    minilm = minilm_spec()
    spec = minilm
    if kind == CROSS_ENCODER:
        spec = encoder_spec(
            name="ce", kind=CROSS_ENCODER, triton_model="ce", tokenizer_dir=minilm.tokenizer_dir,
            max_input_tokens=256, output=model_config.TensorSpec("logits", "TYPE_FP32", (1,)), token_types=True,
        )
    config = triton_config(spec, ONNXRUNTIME)
    backend = FakeBackend()
    model = build_catalog([spec]).models[0]
    tokenizer = EncoderTokenizer(spec.tokenizer_dir / "tokenizer.json", spec.max_input_tokens)
    # 150 sequences over several buckets: several requests, some of max_batch rows.
    sequences = [[101] + [7592] * (n % 200) + [102] for n in range(150)]
    type_ids = [[0] * len(s) for s in sequences] if kind == CROSS_ENCODER else None
    output = spec.outputs[0].name
    values = await EncoderRunner(backend).rows(model, tokenizer, sequences, output=output, type_ids=type_ids, timeout=None)
    assert values.shape == (150, *spec.outputs[0].dims)
    assert len(backend.requests) > 1
    for inputs in backend.requests:
        assert_matches_config(inputs, config)
        assert inputs["input_ids"].shape[1] in bucket_widths(spec.max_input_tokens)


def test_tensorrt_profiles_cover_every_bucket():
    for spec in builtin():
        if spec.kind == "generation":
            continue
        plan = profile_plan(spec)
        check_coverage(spec, plan)
        for width in bucket_widths(spec.max_input_tokens):
            profiles = [p for p in plan if p.covers((1, width)) and p.covers((spec.max_batch, width))]
            assert profiles and any(p.opt[1] == width and p.opt[0] >= 16 for p in profiles), width
        # every length the gateway can send lands in a covered shape
        for length in range(1, spec.max_input_tokens + 1):
            assert any(p.covers((spec.max_batch, bucket_length(length, spec.max_input_tokens))) for p in plan)
    long = replace(minilm_spec(), max_input_tokens=600, max_batch=32)  # 64 x 600 is over MAX_PROFILE_TOKENS
    check_coverage(long, profile_plan(long))
    assert (32, 513) in required_shapes(long) and (32, 600) in required_shapes(long)


def test_a_profile_plan_with_a_gap_is_refused():
    spec = minilm_spec()
    plan = [p for p in profile_plan(spec) if p.opt[1] != 64]
    with pytest.raises(ValueError, match=r"all-minilm-l6-v2.*tokens=64.*64-token bucket"):
        check_coverage(spec, plan)
    with pytest.raises(ValueError, match="not ordered"):
        check_coverage(spec, [Profile((1, 16), (128, 16), (64, 16))] + profile_plan(spec))


def test_mismatches_name_both_values():
    spec = minilm_spec()
    config = triton_config(spec, ONNXRUNTIME)
    assert model_config.mismatches("minilm", 64, spec.inputs, spec.outputs, config) == []
    config.max_batch_size = 32
    config.input[0].data_type = model_config_pb2.TYPE_INT32
    config.output[0].dims[:] = [768]
    extra = config.input.add(name="position_ids", data_type=model_config_pb2.TYPE_INT64, dims=[-1])
    problems = model_config.mismatches("minilm", 64, spec.inputs, spec.outputs, config)
    assert any("max_batch_size is 32" in p and "64" in p for p in problems)
    assert any("'input_ids' is TYPE_INT32" in p and "TYPE_INT64" in p for p in problems)
    assert any("'embedding' has dims [768]" in p and "[384]" in p for p in problems)
    assert any("requires input 'position_ids'" in p for p in problems)
    extra.optional = True
    del config.input[1]
    problems = model_config.mismatches("minilm", 64, spec.inputs, spec.outputs, config)
    assert any("'attention_mask'" in p and "missing" in p for p in problems)
    assert not any("position_ids" in p for p in problems)


class ConfigReplica:
    """A Triton replica that is up and serves `config` for every model."""

    def __init__(self, config):
        self.config = config

    async def is_ready(self, models):
        return True

    async def model_config(self, model):
        return self.config

    async def close(self):
        pass


async def test_gateway_refuses_a_triton_whose_config_disagrees():
    spec = minilm_spec()
    good = triton_config(spec, ONNXRUNTIME)
    bad = triton_config(spec, ONNXRUNTIME)
    bad.max_batch_size = 8
    configs = {"a:1": good, "b:1": bad}
    replicas = ReplicaSet("a:1,b:1", ["minilm"], backend_factory=lambda address: ConfigReplica(configs[address]))
    await replicas.refresh()
    with pytest.raises(StartupError, match=r"max_batch_size is 8 in Triton's config, the gateway sends up to 64 rows per request \(replica b:1\)"):
        await check_triton_configs(replicas, [spec])
    configs["b:1"] = good
    replicas = ReplicaSet("a:1,b:1", ["minilm"], backend_factory=lambda address: ConfigReplica(configs[address]))
    await replicas.refresh()
    await check_triton_configs(replicas, [spec])


def run_gateway(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ragserve_server", "--port", "0", "--metrics-port", "0", "--log-format", "json", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.integration  # starts the gateway process (which refuses to start)
def test_device_gpu_without_a_gpu_fails_at_start_up(tmp_path):
    done = run_gateway("--device", "gpu", "--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()))
    assert done.returncode != 0
    assert "--device gpu: no CUDA GPU is visible" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration  # starts the gateway process (which refuses to start)
def test_missing_artifact_stops_start_up_with_the_file_and_the_fix(tmp_path):
    (tmp_path / "minilm" / "1").mkdir(parents=True)
    (tmp_path / "minilm" / "1" / "model.py").write_text("")
    done = run_gateway("--model-repository", str(tmp_path), "--triton-models", "minilm")
    assert done.returncode != 0
    assert f"{tmp_path}/minilm/1/model.onnx is missing; build it with make models" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_gateway("--triton-models", "minilm,nope", "--triton-url", "127.0.0.1:1")
    assert "unknown built-in model(s) 'nope'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.integration
def test_gateway_refuses_a_real_triton_serving_another_max_batch(tmp_path):
    """A Triton whose minilm config says max_batch_size 32: the gateway exits naming 32 and 64."""
    repository = tmp_path / "repository"
    (repository / "minilm").mkdir(parents=True)
    (repository / "minilm" / "1").symlink_to(MODEL_REPOSITORY / "minilm" / "1", target_is_directory=True)
    config = triton_config(minilm_spec(), ONNXRUNTIME)
    config.max_batch_size = 32
    config.dynamic_batching.preferred_batch_size[:] = [32]  # Triton refuses a preferred size over the max
    model_config.write(repository / "minilm" / "config.pbtxt", config)
    triton = start_triton(tmp_path / "triton", ["minilm"], repository)
    try:
        process = GatewayProcess(triton.grpc_url, ["minilm"], tmp_path / "gateway.log")
        code = process.process.wait(120)
        log = process.log_tail()
        process.stop()
    finally:
        triton.stop()
    assert code != 0
    assert "max_batch_size is 32 in Triton's config, the gateway sends up to 64" in log
    assert "Traceback" not in log


@pytest.mark.integration
def test_a_second_embedding_model_is_one_flag(triton, model_repository, tmp_path):
    """Exported with scripts/export_encoder.py (with input-type prefixes in its registry entry),
    loaded into the running Triton, served by `--embedding-models name=folder` alone: its
    vectors equal the reference, with the prefix for an input type; Tokenize puts the prefix's
    tokens first with (0, 0) offsets."""
    import ragserve
    import tritonclient.grpc as triton_grpc

    from transformers import AutoTokenizer

    from reference import MINILM_DIR, minilm_embeddings

    folder = model_repository / "second-embedder"
    export = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_encoder.py"), "--hf-folder", str(MINILM_DIR), "--out", str(folder),
         "--prompt", "query=query: ", "--prompt", "passage=passage: "],
        capture_output=True, text=True,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    triton_grpc.InferenceServerClient(triton.grpc_url).load_model("second-embedder")
    gateway = GatewayProcess(
        triton.grpc_url, triton.models, tmp_path / "gateway.log", "--embedding-models", f"copy-of-minilm={folder}"
    ).wait_serving()
    try:
        with ragserve.Client(gateway.address, timeout=30) as client:
            texts = ["a second embedding model", "served by one flag"]
            result = client.embed(texts, model="copy-of-minilm")
            assert result.model == "copy-of-minilm"
            np.testing.assert_allclose(result.embeddings, minilm_embeddings(texts), atol=1e-4)
            names = {m.name for m in client.list_models()}
            assert {"copy-of-minilm", "all-minilm-l6-v2"} <= names
            for input_type, prefix in (("query", "query: "), ("passage", "passage: ")):
                typed = client.embed(texts, model="copy-of-minilm", input_type=input_type)
                np.testing.assert_allclose(typed.embeddings, minilm_embeddings([prefix + t for t in texts]), atol=1e-4)
                assert typed.usage.prompt_tokens > result.usage.prompt_tokens
            tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
            text = "Paris is the capital"
            plain = client.tokenize([text], model="copy-of-minilm").results[0]
            typed = client.tokenize([text], model="copy-of-minilm", input_type="query").results[0]
            assert typed.ids == tokenizer("query: " + text)["input_ids"]
            prefix_tokens = len(typed.ids) - len(plain.ids)
            assert prefix_tokens == len(tokenizer("query: ", add_special_tokens=False)["input_ids"]) > 0
            # [CLS], then the prefix's tokens with empty (0, 0) offsets, then the text's own,
            # whose offsets point into the text the caller sent (not the prefixed one).
            assert [tuple(o) for o in typed.offsets[1 : 1 + prefix_tokens]] == [(0, 0)] * prefix_tokens
            assert [tuple(o) for o in typed.offsets[1 + prefix_tokens :]] == [tuple(o) for o in plain.offsets[1:]]
    finally:
        gateway.stop()
