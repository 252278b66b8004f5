"""The GPU stack's versions, in one place: Triton release <-> TensorRT <-> container images.

A TensorRT plan loads only in the TensorRT version that built it (major.minor.patch) and only
on GPUs of the compute capability it was built on. So `make engines` must build with the
TensorRT of the Triton that serves the plans, and the pods that load them must land on nodes
of the builder's compute capability. Everything that names a version reads it here:
scripts/build_engines.py (the version check and its install hint), the Makefile and README
(tests/test_gpu_unit.py checks they name these), the GPU overlay's images and node selector
(deploy/kubernetes/overlays/gpu/, checked by the same tests).

Source: NVIDIA's frameworks support matrix, release 24.10: Triton Inference Server 2.51.0,
TensorRT 10.5.0.18, CUDA 12.6.2, Ubuntu 22.04 (Python 3.10). 2.51 is also the Triton of the
nvidia-pytriton 0.7.0 wheel this project bundles, so the CPU and GPU paths run one version.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TritonRelease:
    release: str  # NGC YY.MM
    triton: str  # Triton server version
    tensorrt: str  # the TensorRT its tensorrt_plan backend links (major.minor.patch)
    cuda: str
    python: str  # the container's python3: the python-backend stub's

    @property
    def triton_image(self) -> str:
        """Every backend (TensorRT plans and the python backend): what a mixed repository needs.
        The -pyt-python-py3 image has no TensorRT backend, so it cannot load the plans."""
        return f"nvcr.io/nvidia/tritonserver:{self.release}-py3"

    @property
    def tensorrt_image(self) -> str:
        """NVIDIA's TensorRT container of the same release (its TensorRT is `tensorrt`)."""
        return f"nvcr.io/nvidia/tensorrt:{self.release}-py3"

    @property
    def tensorrt_pip(self) -> str:
        """The pip requirement that installs this TensorRT into `.venv` (`make engines`)."""
        return f"tensorrt-cu12=={self.tensorrt}"

    @property
    def tensorrt_minor(self) -> str:
        return ".".join(self.tensorrt.split(".")[:2])


TRITON = TritonRelease(release="24.10", triton="2.51.0", tensorrt="10.5.0", cuda="12.6", python="3.10")

# The derived Triton image of the GPU overlay (deploy/kubernetes/overlays/gpu/triton-gpu.Dockerfile):
# TRITON.triton_image plus what the generation engine imports (model_repository/smollm2/1/),
# which NVIDIA's image does not ship (no torch, no safetensors in its python3). torch's CUDA
# 12.4 build runs on the container's CUDA 12.6 driver stack; both pins are the image's.
ENGINE_PYTHON_PACKAGES = ("torch==2.5.1", "safetensors==0.4.5")
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu124"

# The compute capability the GPU overlay's nodes have (NVIDIA GPU feature discovery labels
# nvidia.com/gpu.compute.major/minor): H100 and H200 are 9.0. Plans built on another
# capability need the overlay's node selector changed with them (build_engines says so).
PLAN_COMPUTE_CAPABILITY = (9, 0)


def tensorrt_install_hint(release: TritonRelease = TRITON) -> str:
    return (
        f"install TensorRT {release.tensorrt}, the TensorRT of Triton {release.release} ({release.triton_image}) that "
        f"serves the plans, into .venv on the machine with the NVIDIA GPU: .venv/bin/pip install '{release.tensorrt_pip}'"
    )


def check_tensorrt_version(installed: str, release: TritonRelease = TRITON) -> None:
    """Raises ValueError naming both versions unless `installed` is the release's TensorRT
    (major.minor.patch; a build number or local suffix after it is ignored)."""
    wanted = release.tensorrt.split(".")[:3]
    have = installed.split("+")[0].split(".")[:3]
    if have != wanted:
        raise ValueError(
            f"TensorRT {installed} is installed, but Triton {release.release} ({release.triton_image}) runs TensorRT "
            f"{release.tensorrt}: a plan loads only in the TensorRT version that built it. {tensorrt_install_hint(release)}"
        )


def compute_capability_note(capability: tuple[int, int]) -> str:
    """"" when `capability` is the overlay's, else what to change for plans built on it."""
    if tuple(capability) == PLAN_COMPUTE_CAPABILITY:
        return ""
    major, minor = capability
    want = ".".join(map(str, PLAN_COMPUTE_CAPABILITY))
    return (
        f"these plans are for compute capability {major}.{minor}; the GPU overlay selects {want} nodes: set "
        f"nvidia.com/gpu.compute.major: \"{major}\" and nvidia.com/gpu.compute.minor: \"{minor}\" in "
        "deploy/kubernetes/overlays/gpu/triton-gpu.yaml (and tag the models image with it)"
    )
