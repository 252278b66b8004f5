# The GPU model repository as an image, copied into each Triton pod by an init container
# (overlays/gpu/triton-gpu.yaml). Build it on the GPU machine that ran `make engines`, with
# the repository folder as the build context:
#
#   make engines
#   docker build -f deploy/kubernetes/overlays/gpu/models-gpu.Dockerfile \
#     -t REGISTRY/ragserve-models-gpu:TAG build/model_repository_gpu
#
# TensorRT plans load only on the GPU architecture and TensorRT version that built them:
# tag the image with both (e.g. 0.1.0-h100-trt10.5) and serve it on matching nodes.
FROM busybox:1.37.0
COPY . /models
USER 1000:1000
