"""The GPU path, as far as a machine without a GPU can check it.

Rendered GPU configs parse; the PyTorch encoder template (the `torch_cuda` variant) runs for
real, in-process and in the bundled Triton, on the CPU and matches the reference; the
TensorRT profile plan covers every bucket; `scripts/build_engines.py` fails clearly without
TensorRT. CUDA execution and the TensorRT build themselves run in `bench/gpu_check.sh` on a
machine with an NVIDIA GPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from ragserve_server.models import model_config
from ragserve_server.models.registry import DEVICES, ENCODER_BACKENDS, GPU, TEMPLATES, TENSORRT, TORCH_CUDA
from ragserve_server.models.builtin import minilm_spec
from ragserve_server.models.gpu_versions import TRITON
from ragserve_server.models.repository import render_repository
from ragserve_server.models.tensorrt_profiles import check_coverage, profile_plan
from ragserve_server.models.buckets import bucket_widths
from reference import cosine_rows, minilm_embeddings
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer
from support import MODEL_REPOSITORY, ROOT, BackendRequest, free_port, load_template, minilm_tokens

KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "A short one.",
    "Tokenizers split text into word pieces, and the gateway pads them to length buckets of 16, 32 or 64 tokens.",
]


def specs():
    """minilm, and smollm2 where its generation contract is importable (another change adds it)."""
    found = [minilm_spec()]
    try:
        from ragserve_server.models.builtin import smollm2_spec

        found.append(smollm2_spec(MODEL_REPOSITORY))
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoder_backend", ENCODER_BACKENDS)
def test_every_rendered_config_parses(tmp_path, device, encoder_backend):
    rendered = render_repository(specs(), device, tmp_path, encoder_backend=encoder_backend)
    assert "minilm" in rendered
    for name, variant in rendered.items():
        config = model_config.read(tmp_path / name / "config.pbtxt")  # raises on anything ModelConfig rejects
        assert isinstance(config, model_config_pb2.ModelConfig) and config.name == name
        assert config.instance_group[0].kind == (KIND_CPU if device == "cpu" else KIND_GPU)
        if variant == TENSORRT:
            assert config.platform == "tensorrt_plan"
            # Triton only uses profile 0 unless the instance group lists them all.
            assert list(config.instance_group[0].profile) == [str(i) for i in range(len(profile_plan(minilm_spec())))]
        else:
            assert config.backend == "python"
    if device == GPU and encoder_backend == TORCH_CUDA:
        minilm = model_config.read(tmp_path / "minilm" / "config.pbtxt")
        params = model_config.parameters_of(minilm)
        assert params["head"] == "mean_pool" and params["dtype"] == "float16"
        assert (tmp_path / "minilm" / "1" / "model.py").read_text() == (TEMPLATES / "torch_encoder_model.py").read_text()


# --- the PyTorch encoder template, in-process with a stand-in for Triton's python backend ---


@pytest.fixture()
def template(monkeypatch):
    return load_template(monkeypatch, "torch_encoder_model.py")


@pytest.mark.parametrize(("version", "keyword"), [("4.46.3", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.23.0", "dtype")])
def test_template_names_the_dtype_as_the_installed_transformers_does(template, monkeypatch, version, keyword):
    import torch
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert template.dtype_argument(torch.float16) == {keyword: torch.float16}


def _args(tmp_path, kind: str, parameters: dict[str, str]) -> dict:
    spec = minilm_spec()
    render_repository([spec], GPU, tmp_path, encoder_backend=TORCH_CUDA)
    config = model_config.read(tmp_path / "minilm" / "config.pbtxt")
    model_config.set_parameters(config, parameters)
    from google.protobuf import json_format

    return {
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(tmp_path / "minilm"),
        "model_version": "1",
        "model_instance_kind": kind,
        "model_instance_device_id": "0",
    }


def test_template_pads_requests_of_different_widths_and_matches_the_reference(tmp_path, template):
    model = template.TritonPythonModel()
    model.initialize(_args(tmp_path, "CPU", {"dtype": "float16"}))  # a CPU instance runs float32 regardless
    short = minilm_tokens(TEXTS[:3], width=16)
    long = minilm_tokens(TEXTS[3:], width=32)
    responses = model.execute([BackendRequest(input_ids=i, attention_mask=m) for i, m in (short, long)])
    assert [r[0].array.shape for r in responses] == [(3, 384), (1, 384)]
    assert all(r[0].name == "embedding" and r[0].array.dtype == np.float32 for r in responses)
    got = np.concatenate([r[0].array for r in responses])
    assert cosine_rows(got, minilm_embeddings(TEXTS)).min() >= 0.9999


def test_template_gpu_instance_without_cuda_is_a_clear_error(tmp_path, template):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(sys.modules["triton_python_backend_utils"].TritonModelException, match="KIND_GPU.*no CUDA device"):
        template.TritonPythonModel().initialize(_args(tmp_path, "GPU", {}))


def test_template_rejects_a_folder_without_weights(tmp_path, template):
    with pytest.raises(sys.modules["triton_python_backend_utils"].TritonModelException, match="hf_dir.*config.json"):
        template.TritonPythonModel().initialize(_args(tmp_path, "CPU", {"hf_dir": "1/missing"}))


# --- the same template in the bundled Triton ---


def _use_this_pythons_libpython(monkeypatch) -> None:
    """The python-backend stub loads the first libpython3.X.so on the library path; where that is
    another build than the virtualenv's Python (here: Debian's 3.11.2 under pyenv's 3.11.7), its
    extension modules fail to import (`_ssl`: undefined symbol), and transformers needs them."""
    import os
    import sysconfig

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        monkeypatch.setenv("LD_LIBRARY_PATH", os.pathsep.join(filter(None, (libdir, os.environ.get("LD_LIBRARY_PATH")))))


@pytest.mark.integration
def test_torch_encoder_in_triton_on_the_cpu_matches_the_reference(tmp_path, monkeypatch):
    import tritonclient.grpc as triton_grpc

    _use_this_pythons_libpython(monkeypatch)

    repository = tmp_path / "repository"
    render_repository([minilm_spec()], GPU, repository, encoder_backend=TORCH_CUDA)
    path = repository / "minilm" / "config.pbtxt"
    config = model_config.read(path)
    config.instance_group[0].kind = KIND_CPU  # this machine has no GPU: same model file, on the CPU
    model_config.set_parameters(config, {"dtype": "float32"})
    model_config.write(path, config, "torch_cuda variant switched to KIND_CPU / float32 for a CPU test")

    # Not support.start_triton: its artifact check wants the CPU variant's model.onnx.
    triton = TritonServer(repository, ["minilm"], TritonPorts(free_port(), free_port(), free_port()), tmp_path / "triton")
    triton.start()
    try:
        triton.wait_ready(180)
        client = triton_grpc.InferenceServerClient(triton.grpc_url)
        got = []
        for texts, width in ((TEXTS[:3], 16), (TEXTS[3:], 32)):  # two length buckets
            ids, mask = minilm_tokens(texts, width)
            inputs = [triton_grpc.InferInput("input_ids", ids.shape, "INT64"), triton_grpc.InferInput("attention_mask", mask.shape, "INT64")]
            inputs[0].set_data_from_numpy(ids)
            inputs[1].set_data_from_numpy(mask)
            result = client.infer("minilm", inputs, outputs=[triton_grpc.InferRequestedOutput("embedding")])
            got.append(result.as_numpy("embedding"))
    finally:
        triton.stop()
    embeddings = np.concatenate(got)
    assert embeddings.shape == (4, 384) and embeddings.dtype == np.float32
    assert cosine_rows(embeddings, minilm_embeddings(TEXTS)).min() >= 0.9999


# --- TensorRT: the profile plan, and build_engines.py without TensorRT ---


def test_profile_plan_covers_every_bucket_and_a_gap_is_refused():
    spec = minilm_spec()
    plan = profile_plan(spec)
    check_coverage(spec, plan)
    assert sorted(p.opt[1] for p in plan) == bucket_widths(spec.max_input_tokens)
    for width in bucket_widths(spec.max_input_tokens):
        gap = [p for p in plan if p.opt[1] != width]
        with pytest.raises(ValueError, match=rf"'{spec.name}'.*tokens={width}\).*{width}-token bucket"):
            check_coverage(spec, gap)


def test_build_engines_without_tensorrt_fails_clearly():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_engines.py"), "--out", "/nonexistent/never-written"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "TensorRT is not importable" in result.stderr
    assert f"pip install '{TRITON.tensorrt_pip}'" in result.stderr and TRITON.tensorrt_pip == "tensorrt-cu12==10.5.0"
    assert not Path("/nonexistent/never-written").exists()
