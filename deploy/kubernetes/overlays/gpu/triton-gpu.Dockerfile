# The Triton image of the GPU overlay: NVIDIA's Triton 24.10 with every backend (the TensorRT
# plans of `make engines` need its tensorrt_plan backend, which the -pyt-python-py3 image
# lacks) plus what the generation engine (model_repository/smollm2/1/, python backend)
# imports and NVIDIA's image does not ship: torch and safetensors. The versions are those of
# server/ragserve_server/models/gpu_versions.py (TRITON, ENGINE_PYTHON_PACKAGES,
# TORCH_INDEX_URL); tests/test_gpu_unit.py checks this file against it and against the
# engine's imports. Build from the repository root (the engine's modules are imported once
# at build time, so a missing package fails the build, not the pod):
#
#   docker build -f deploy/kubernetes/overlays/gpu/triton-gpu.Dockerfile \
#     -t REGISTRY/ragserve-triton-gpu:0.1.0-trt10.5 .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
# torch's CUDA 12.4 build runs on the image's CUDA 12.6 driver stack; Python 3.10 (the image's).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
RUN python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.5.1 \
    && python3 -m pip install --no-cache-dir safetensors==0.4.5
COPY model_repository/smollm2/1/*.py /tmp/engine/
RUN cd /tmp/engine \
    && python3 -c "import sys; sys.path.insert(0, '.'); import engine, engine_config, kv_slots, llama, sampler" \
    && rm -rf /tmp/engine
# triton-server (1000), the unprivileged user of NVIDIA's image, as the overlay's pods run.
USER 1000:1000
