"""The GPU path's pieces that need no GPU, checked here (issue 24).

- the TensorRT version check: a plan loads only in the TensorRT that built it, so
  `make engines` refuses any TensorRT but Triton 24.10's (10.5.0), naming both;
- scripts/build_engines.py end to end with a stand-in `tensorrt` module and plan runner:
  every plan is compared with ONNX Runtime on reference texts in every bucket (min cosine
  >= 0.999) before anything is written, and a failing plan leaves no config behind;
- the rendered GPU configs: no preferred batch sizes, one KIND_GPU instance per GPU (no
  device pinned: Triton passes each instance its device id), profiles within rows x tokens;
- the generation engine's CUDA settings, its instance device id, and its cancel probes paced
  by a clock (a fake one here);
- the Makefile, README and the GPU overlay name the versions of gpu_versions.py, and the
  overlay selects nodes of the plans' compute capability.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from ragserve_server.models import gpu_versions, model_config
from ragserve_server.models.builtin import minilm_spec, smollm2_spec
from ragserve_server.models.generation_contract import ENGINE_PARAMETERS, ENGINE_PARAMETERS_CUDA, MAX_BATCH_SIZE, engine_parameters
from ragserve_server.models.gpu_versions import TRITON, check_tensorrt_version
from ragserve_server.models.registry import GPU, TENSORRT, TORCH_CUDA
from ragserve_server.models.repository import render_repository, triton_config
from ragserve_server.models.tensorrt_profiles import MAX_PROFILE_TOKENS, check_coverage, max_rows, profile_plan
from support import import_or_unavailable, unavailable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_engines  # noqa: E402

MINILM_ONNX = ROOT / "model_repository" / "minilm" / "1" / "model.onnx"
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


# --- versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("installed", ["10.5.0", "10.5.0.18", "10.5.0.post1", "10.5.0+cuda12"])
def test_the_serving_tritons_tensorrt_is_accepted(installed):
    check_tensorrt_version(installed)


@pytest.mark.parametrize("installed", ["10.7.0", "10.5.1", "11.4.0.106", "10.4.0"])
def test_another_tensorrt_is_refused_naming_both_versions(installed):
    with pytest.raises(ValueError) as err:
        check_tensorrt_version(installed)
    message = str(err.value)
    assert f"TensorRT {installed} is installed" in message and "runs TensorRT 10.5.0" in message
    assert "Triton 24.10" in message and "pip install 'tensorrt-cu12==10.5.0'" in message


def test_one_place_for_the_versions():
    assert (TRITON.release, TRITON.triton, TRITON.tensorrt) == ("24.10", "2.51.0", "10.5.0")
    # Triton 2.51 is also the bundled wheel's (nvidia-pytriton 0.7.0): one version on every device.
    assert "nvidia-pytriton==0.7.0" in (ROOT / "requirements-nodeps.txt").read_text().split()
    assert TRITON.triton_image == "nvcr.io/nvidia/tritonserver:24.10-py3"


def test_makefile_and_readme_name_the_same_versions():
    makefile = (ROOT / "Makefile").read_text()
    engines = makefile[makefile.index("# The GPU repository for NVIDIA's Triton container"):makefile.index("engines: models")]
    assert TRITON.tensorrt_pip in engines and TRITON.triton_image in engines
    readme = (ROOT / "README.md").read_text()
    assert TRITON.tensorrt_pip in readme
    named = set(re.findall(r"nvcr\.io/nvidia/[\w-]+:[\w.-]+", readme + engines))
    releases = {image.split(":")[1].split("-")[0] for image in named}
    assert releases == {TRITON.release}, f"README/Makefile name containers of other releases: {named}"
    assert not re.search(r"tensorrt-cu12==(?!10\.5\.0)", readme + engines)


# --- build_engines with a stand-in TensorRT -----------------------------------------------------


class FakeTensorRT(types.SimpleNamespace):
    """The parts of the `tensorrt` module build_engines uses, for one model; plans are b"plan"."""

    def __init__(self, version: str, spec):
        dtype = lambda name: types.SimpleNamespace(name=name)  # noqa: E731
        inputs = [t.name for t in spec.inputs]
        outputs = [t.name for t in spec.outputs]

        class Engine:
            num_io_tensors = len(inputs) + len(outputs)
            num_optimization_profiles = len(profile_plan(spec))

            def get_tensor_name(self, i):
                return (inputs + outputs)[i]

            def get_tensor_mode(self, name):
                return "input" if name in inputs else "output"

            def get_tensor_dtype(self, name):
                return dtype("INT64" if name in inputs else "FLOAT")

        class Network:
            num_inputs = len(inputs)

            def get_input(self, i):
                return types.SimpleNamespace(name=inputs[i])

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                self.path = path
                return True

        class Config:
            def __init__(self):
                self.profiles = []

            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                pass

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                assert lo[0] * lo[1] <= opt[0] * opt[1] <= hi[0] * hi[1] <= MAX_PROFILE_TOKENS

        class Builder:
            def __init__(self, logger):
                self.built = []

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan"

        super().__init__(
            __version__=version,
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
            Builder=Builder,
            OnnxParser=Parser,
            MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
            BuilderFlag=types.SimpleNamespace(FP16=1),
            TensorIOMode=types.SimpleNamespace(INPUT="input"),
            Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: Engine()),
        )


def build_args(out: Path) -> argparse.Namespace:
    return argparse.Namespace(out=out, source=ROOT / "model_repository", cross_encoders="", embedding_models="", workspace_gib=1.0)


needs_onnx = pytest.mark.skipif(not MINILM_ONNX.is_file(), reason="make models builds model_repository/minilm/1/model.onnx")


@pytest.fixture()
def no_generation(monkeypatch):
    """The GPU repository of MiniLM alone: without SmolLM2's 500 MB of weights (copied
    otherwise) and the other built-in encoders (their own tests)."""
    monkeypatch.setattr(build_engines, "generation_models", lambda source: [])
    spec = minilm_spec()
    monkeypatch.setattr(build_engines, "encoders", lambda source, cross, embedding: ([spec], {spec.name: Path(source) / spec.triton_model}))


def ort_runner(noise: float = 0.0, seen: list | None = None):
    """A plan runner that is ONNX Runtime itself (what a correct FP16 plan comes close to), plus `noise`."""

    def make(trt, logger, plan):
        assert plan == b"plan"
        reference = build_engines.onnx_reference(MINILM_ONNX)
        rng = np.random.default_rng(0)

        def run(feeds, profile):
            if seen is not None:
                seen.append((tuple(feeds["input_ids"].shape), profile))
            out = reference(feeds)
            return {k: v + noise * rng.standard_normal(v.shape).astype(v.dtype) for k, v in out.items()}

        return run

    return make


@needs_onnx
def test_a_mismatched_tensorrt_stops_before_anything_is_built(tmp_path, no_generation):
    spec = minilm_spec()
    with pytest.raises(build_engines.BuildError) as err:
        build_engines.build(build_args(tmp_path / "gpu"), tensorrt=FakeTensorRT("10.7.0", spec), runner=ort_runner())
    assert "TensorRT 10.7.0 is installed" in str(err.value) and "10.5.0" in str(err.value)
    assert not (tmp_path / "gpu").exists()


@needs_onnx
def test_every_plan_is_checked_against_onnx_runtime_in_every_bucket_before_writing(tmp_path, no_generation):
    spec = minilm_spec()
    seen = []
    out = tmp_path / "gpu"
    agreement = build_engines.build(build_args(out), tensorrt=FakeTensorRT("10.5.0.18", spec), runner=ort_runner(seen=seen))
    assert agreement[spec.name] >= build_engines.MIN_COSINE
    profiles = profile_plan(spec)
    assert {index for _, index in seen} == set(range(len(profiles))), "every profile runs on reference texts"
    assert (spec.max_batch, 16) in {shape for shape, _ in seen}
    for shape, index in seen:
        assert profiles[index].covers(shape)
    assert (out / "minilm" / "1" / "model.plan").read_bytes() == b"plan"
    config = model_config.read(out / "minilm" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and not config.dynamic_batching.preferred_batch_size
    versions = (out / "engines.json").read_text()
    assert '"tensorrt": "10.5.0.18"' in versions and '"triton_release": "24.10"' in versions


@needs_onnx
def test_a_plan_that_disagrees_with_onnx_runtime_writes_no_config(tmp_path, no_generation):
    spec = minilm_spec()
    out = tmp_path / "gpu"
    with pytest.raises(build_engines.BuildError) as err:
        build_engines.build(build_args(out), tensorrt=FakeTensorRT("10.5.0", spec), runner=ort_runner(noise=0.5))
    assert "min cosine" in str(err.value) and spec.name in str(err.value)
    assert not (out / "minilm" / "config.pbtxt").exists() and not (out / "minilm" / "1" / "model.plan").exists()
    assert not list(tmp_path.glob(".plans-*")), "the staged plans are removed"


def test_scores_are_compared_as_one_vector_and_zero_rows_agree():
    scores = np.array([[1.0], [-2.0], [3.0]])
    assert build_engines.cosines(scores * 1.001, scores).min() > 0.999
    assert build_engines.cosines(-scores, scores).min() < 0
    vectors = np.array([[0.0, 0.0], [1.0, 2.0]])
    assert build_engines.cosines(vectors, vectors).tolist() == pytest.approx([1.0, 1.0])
    assert build_engines.cosines(np.array([[np.nan, 1.0]]), np.array([[1.0, 1.0]])).min() == -1.0


# --- rendered GPU configs ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", [TORCH_CUDA, TENSORRT])
def test_gpu_encoder_configs_have_no_preferred_batch_sizes(variant):
    config = triton_config(minilm_spec(), variant)
    assert not config.dynamic_batching.preferred_batch_size
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    (group,) = config.instance_group
    # KIND_GPU without `gpus`: Triton makes an instance on every GPU and passes each its
    # device id (model_instance_device_id), which the python models read.
    assert group.kind == KIND_GPU and not group.gpus


def test_cpu_config_keeps_its_batch_size():
    from ragserve_server.models.registry import ONNXRUNTIME

    assert list(triton_config(minilm_spec(), ONNXRUNTIME).dynamic_batching.preferred_batch_size) == [minilm_spec().max_batch]


def test_profiles_are_bounded_in_rows_times_tokens():
    spec = minilm_spec()
    for profile in profile_plan(spec):
        assert profile.max[0] * profile.max[1] <= MAX_PROFILE_TOKENS
    long = dataclasses.replace(spec, name="long-context", max_input_tokens=8192)
    with pytest.raises(ValueError) as err:
        check_coverage(long, profile_plan(long))
    assert f"--max-batch {MAX_PROFILE_TOKENS // 8192}" in str(err.value) and "64 rows x 8192 tokens" in str(err.value)
    fitted = dataclasses.replace(long, max_batch=max_rows(long))
    check_coverage(fitted, profile_plan(fitted))
    cross = dataclasses.replace(spec, name="cross-512", max_input_tokens=512)
    check_coverage(cross, profile_plan(cross))  # 64 x 512: the default cross-encoder fits


# --- the generation engine on CUDA -------------------------------------------------------------


def test_the_engine_has_cuda_settings_of_its_own(tmp_path):
    cpu, cuda = engine_parameters("cpu"), engine_parameters("cuda")
    assert cpu == {**ENGINE_PARAMETERS, "device": "cpu"}
    assert cuda["device"] == "cuda" and set(cuda) == set(cpu)
    assert int(cuda["max_running_sequences"]) == MAX_BATCH_SIZE > int(cpu["max_running_sequences"])
    assert int(cuda["prefill_tokens_per_step"]) >= 512 > int(cpu["prefill_tokens_per_step"])
    assert int(cuda["max_kv_tokens"]) == MAX_BATCH_SIZE * int(cpu["context_length"])
    assert set(ENGINE_PARAMETERS_CUDA) <= set(ENGINE_PARAMETERS)
    rendered = render_repository([smollm2_spec()], GPU, tmp_path)
    assert rendered == {"smollm2": TORCH_CUDA}
    config = model_config.read(tmp_path / "smollm2" / "config.pbtxt")
    params = model_config.parameters_of(config)
    assert {k: params[k] for k in cuda} == cuda
    (group,) = config.instance_group
    assert group.kind == KIND_GPU and not group.gpus


VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"


@pytest.fixture(scope="module")
def engine_modules():
    import_or_unavailable("torch")
    sys.path.insert(0, str(VERSION_DIR))
    import engine
    import engine_config

    return engine, engine_config


def test_the_engine_runs_on_its_instances_gpu(engine_modules, monkeypatch):
    _, engine_config = engine_modules
    import torch

    assert engine_config.instance_device_index({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == 3
    assert engine_config.instance_device_index({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) is None
    config = engine_config.EngineConfig.from_parameters({k: v for k, v in engine_parameters("cuda").items() if k != "hf_dir"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.torch_device(3) == torch.device("cuda", 3)
    assert config.torch_device() == torch.device("cuda")
    model_py = (VERSION_DIR / "model.py").read_text()
    assert "instance_device_index(args)" in model_py and "device_index=device_index" in model_py


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = import_or_unavailable("transformers")
    import torch

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cancel_probes_are_paced_by_the_clock_and_asked_outside_the_lock(engine_modules, tiny_llama):
    """Steps driven by hand (no engine thread): 10 steps within one poll interval ask each
    probe once; after the interval, once more; a probe never runs with the engine's lock held;
    an in-process cancel is seen at the next step whatever the clock."""
    engine, engine_config = engine_modules
    params = {k: v for k, v in engine_parameters("cpu").items() if k != "hf_dir"}
    config = engine_config.EngineConfig.from_parameters(params | {"max_running_sequences": "1"})
    clock = FakeClock()
    eng = engine.Engine(tiny_llama, config, clock=clock)
    asked = {"running": 0, "waiting": 0}
    cancel_waiting = threading.Event()

    def probe(kind):
        def is_cancelled():
            assert not eng._cv._is_owned(), "a cancel probe ran under the engine's lock"
            asked[kind] += 1
            return kind == "waiting" and cancel_waiting.is_set()
        return is_cancelled

    aborted = []
    running = engine.Sequence(prompt=[5, 6, 7], max_tokens=50, params=engine.SamplingParams(temperature=0.0),
                              on_token=lambda t, r: None, is_cancelled=probe("running"), ignore_eos=True)
    waiting = engine.Sequence(prompt=[8, 9], max_tokens=5, params=engine.SamplingParams(temperature=0.0),
                              on_token=lambda t, r: None, on_abort=lambda kind, msg: aborted.append(kind),
                              is_cancelled=probe("waiting"))
    eng.submit(running)
    eng.submit(waiting)
    import torch

    with torch.inference_mode():
        for _ in range(10):
            eng._step()
            clock.now += engine.CANCEL_POLL_INTERVAL_S / 20
        assert eng.cancel_polls == 1 and asked["waiting"] == 1 and asked["running"] <= 1
        clock.now += engine.CANCEL_POLL_INTERVAL_S
        cancel_waiting.set()
        eng._step()
        assert eng.cancel_polls == 2 and asked["waiting"] == 2 and aborted == ["cancelled"]
        assert waiting not in eng.waiting
        running.cancel()  # in-process: no probe needed
        eng._step()
    assert running not in eng.running and eng.cancel_polls == 2


# --- the GPU overlay and its Triton image --------------------------------------------------------

GPU_OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "gpu"
TRITON_DOCKERFILE = GPU_OVERLAY / "triton-gpu.Dockerfile"


def rendered_triton() -> dict:
    import shutil
    import subprocess

    import yaml

    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl is not installed: `make setup`")
    result = subprocess.run([kubectl, "kustomize", str(GPU_OVERLAY)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ragserve-triton")


def test_gpu_pods_land_only_on_nodes_of_the_plans_compute_capability():
    pod = rendered_triton()["spec"]["template"]["spec"]
    major, minor = gpu_versions.PLAN_COMPUTE_CAPABILITY
    assert pod["nodeSelector"]["nvidia.com/gpu.compute.major"] == str(major)
    assert pod["nodeSelector"]["nvidia.com/gpu.compute.minor"] == str(minor)
    assert gpu_versions.compute_capability_note((major, minor)) == ""
    note = gpu_versions.compute_capability_note((8, 0))
    assert 'nvidia.com/gpu.compute.major: "8"' in note and "triton-gpu.yaml" in note


def test_one_gpu_pods_roll_out_without_a_spare_gpu():
    deployment = rendered_triton()
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}
    (triton,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert triton["image"].split(":")[0] == "ragserve-triton-gpu"


def test_the_triton_image_carries_what_the_generation_engine_imports():
    import ast

    text = TRITON_DOCKERFILE.read_text()
    assert f"ARG TRITON_IMAGE={TRITON.triton_image}\n" in text
    assert f"ARG TORCH_INDEX_URL={gpu_versions.TORCH_INDEX_URL}\n" in text
    for package in gpu_versions.ENGINE_PYTHON_PACKAGES:
        assert package in text
    carried = {p.split("==")[0] for p in gpu_versions.ENGINE_PYTHON_PACKAGES} | {"numpy"}  # numpy: the python backend's own
    local = {p.stem for p in VERSION_DIR.glob("*.py")}
    imported = set()
    for path in VERSION_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local - {"__future__", "triton_python_backend_utils"}
    assert third_party <= carried, f"the engine imports {sorted(third_party - carried)}, which the Triton image does not install"
    modules = re.search(r"import (engine[\w, ]+)\"", text).group(1)
    assert {"engine", "sampler", "llama"} <= {m.strip() for m in modules.split(",")}


# --- bench/gpu_check.sh's prerequisites and the engine check's comparison --------------------------


def test_the_gpu_check_names_each_missing_prerequisite():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check_preflight

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert not [m for m in gpu_check_preflight.missing(here) if m.startswith("python3")]
    other = "3.99"
    (line,) = [m for m in gpu_check_preflight.missing(other) if m.startswith("python3")]
    assert f"python3 {other}: python3 is {here}" in line
    header = (ROOT / "bench" / "gpu_check.sh").read_text().split("set -euo pipefail")[0]
    for prerequisite in ("nvidia-smi -L", "python3 3.12", "shared libpython3.12", "torch with CUDA", "transformers",
                         "tokenizers", "numpy >= 2", "tar, xz and timeout", ".whl/site.tar.xz"):
        assert prerequisite in header, prerequisite


def test_the_engine_check_forgives_only_near_ties():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_engine_check as check

    def stream(tokens, margins):
        s = check.Stream()
        s.tokens, s.margins = tokens, margins
        return s

    # CPU streams with the margin of each step's choice; stream 0 parts at step 2, stream 1 at step 1.
    cpu = [stream([1, 2, 3], [1.0, 1.0, 0.01]), stream([4, 5, 6], [1.0, 1.0, 1.0]), stream([7, 8], [1.0, 1.0])]
    cuda = [stream([1, 2, 9], []), stream([4, 9, 6], []), stream([7, 8], [])]
    assert check.compare(cpu, [cuda[0], cpu[1], cuda[2]], tie_margin=0.05) == (2, 1, [])  # parted at a near-tie
    equal, ties, problems = check.compare(cpu, cuda, 0.05)
    assert (equal, ties) == (1, 1) and len(problems) == 1 and "prompt 1: token 1 is 9, the CPU's 5" in problems[0]
    assert check.compare(cpu, cuda, 0.0)[2][0].startswith("prompt 0: token 2 is 9")  # no tolerance: a mismatch
