#!/usr/bin/env bash
# GPU check: Embed through the gateway and the bundled Triton running MiniLM on CUDA (PyTorch
# fp16, the `torch_cuda` variant), concurrency 1/16/64, side by side with the raw PyTorch CUDA
# model at its best batch (the ceiling), plus min cosine against a CPU fp32 reference.
# What it measures and prints: bench/gpu_check.py. Then the generation engine on CUDA (fp16,
# its CUDA settings) against itself on the CPU, greedy, and its tokens/s at 1 and 16 streams:
# bench/gpu_engine_check.py (a random Llama of SmolLM2's shape: the weights cannot travel).
#
# 1. Here (this machine, network to PyPI), once: build what the GPU machine lacks into .whl/
#    (git-ignored through .git/info/exclude), about 58 MiB:
#        bash bench/gpu_check.sh --prepare
#    .whl/site.tar.xz holds, for the device's Python 3.12: the Triton server, python backend and
#    3.12 stub of the nvidia-pytriton 0.7.0 wheel (its libraries, without the wheel's Python code
#    and other Pythons' stubs), grpcio 1.76 + protobuf 6.33 (what our generated stubs require), grpcio-health-checking,
#    grpcio-reflection, tritonclient 2.41 (without its perf_analyzer binaries), structlog,
#    prometheus-client and whatever else `gpu_check.py pins` lists (pins of requirements.txt), and
#    all-MiniLM-L6-v2 in fp16 with an unused-vocabulary-pruned embedding matrix (see
#    gpu_check.py). Not numpy: the device's numpy 2 serves the stub too (CARRIED in gpu_check.py).
#    .whl/gpu_check/reference.npz: the fp32 ONNX Runtime reference embeddings.
#    The whole wheels would be 55 + 18 + 12 + 7 MB and the fp32 weights 87 MB: over the 64 MiB
#    a call may carry, hence one xz archive.
#
# 2. On the lent GPU machine, one call of the device tool (about 3-4 minutes once started):
#        run  command:   bash bench/gpu_check.sh
#             carry:     [".whl"]
#             timeout_s: 480
#    then give_back unless you rerun at once. It prints the table last; $OUT gets gpu_check.md
#    and the Triton and gateway logs.
#
# 3. Here, the same steps on the CPU (KIND_CPU, fp32, short runs), with the carried weights
#    when .whl has been prepared:
#        bash bench/gpu_check.sh --cpu-smoke
#
# Prerequisites of the device run (step 2), all checked first (`--preflight` checks only
# them); each missing one is named with its fix before anything is unpacked or started:
#   - an NVIDIA GPU with its driver (`nvidia-smi -L` lists one)
#   - python3 3.12: the carry holds cp312 wheels and the Triton python-backend stub for 3.12
#   - a shared libpython3.12 (LIBDIR/INSTSONAME of that python3): the stub links it
#   - in that python3, not carried: torch with CUDA (torch.cuda.is_available()), transformers,
#     tokenizers, numpy >= 2 (gpu_check.py CARRIED says why the device's numpy serves)
#   - tar, xz and timeout on PATH
#   - .whl/site.tar.xz and .whl/gpu_check/reference.npz (step 1, carried with the call)
# (bench/gpu_check_preflight.py checks the Python ones with the standard library only.)
# Step 3 needs `make setup models` here (.venv with the project's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE_PY=3.12
STAGE=build/gpu_check   # git-ignored staging (build/)

prepare() {
  local py=.venv/bin/python
  local platforms=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
                   --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -rf "$STAGE" .whl && mkdir -p "$STAGE/wheels" "$STAGE/site" .whl/gpu_check
  local pins
  pins=$("$py" bench/gpu_check.py pins)
  echo "gpu_check: carrying" $pins
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" --implementation cp \
    "${platforms[@]}" -d "$STAGE/wheels" $pins
  # Everything but nvidia-pytriton installs as usual (for cp312), then loses what is never used.
  "$py" -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: --target "$STAGE/site" \
    --python-version "$DEVICE_PY" --implementation cp "${platforms[@]}" \
    $(ls "$STAGE"/wheels/*.whl | grep -v nvidia_pytriton)
  rm -rf "$STAGE/site/bin"
  # nvidia-pytriton: only the server, its libraries, the python backend and the 3.12 stub.
  unzip -q "$STAGE"/wheels/nvidia_pytriton-*.whl -d "$STAGE/pytriton" \
    'pytriton/tritonserver/bin/*' 'pytriton/tritonserver/backends/*' \
    "pytriton/tritonserver/python_backend_stubs/$DEVICE_PY/*" 'nvidia_pytriton.libs/*' -x 'nvidia_pytriton.libs/libpython3*'
  cp -a "$STAGE/pytriton/." "$STAGE/site/"
  chmod +x "$STAGE/site/pytriton/tritonserver/bin/tritonserver" "$STAGE"/site/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
  # The reference (from model_repository/minilm/1/model.onnx: `make models` first) and the weights.
  "$py" bench/gpu_check.py prepare --out "$STAGE/minilm"
  cp -a "$STAGE/minilm/pkg/." "$STAGE/site/"
  cp "$STAGE/minilm/reference.npz" .whl/gpu_check/
  tar -C "$STAGE/site" -cf - . | xz -9 -T2 > .whl/site.tar.xz
  # h2load (the native load of bench/native_load.py) and the libraries an image may lack, as .deb files (~2 MB).
  mkdir -p .whl/debs && (cd .whl/debs && apt-get download -q nghttp2-client libnghttp2-14 libev4 libjansson4 libjemalloc2 libxml2)
  du -sh .whl/* .whl
  local bytes
  bytes=$(du -sb .whl | cut -f1)
  if (( bytes > 60 * 1024 * 1024 )); then
    echo "gpu_check: .whl is $bytes bytes; with the working tree it must stay under 64 MiB" >&2
    exit 1
  fi
}

# Every prerequisite of the header, all checked, each missing one named with its fix; exit 2 if any.
preflight() {
  local missing=() tool report line
  for tool in tar xz timeout python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool: not on PATH (install it)")
  done
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    missing+=("nvidia-smi: not on PATH: no NVIDIA driver here (run on a machine with an NVIDIA GPU)")
  elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    missing+=("an NVIDIA GPU: nvidia-smi -L lists none")
  fi
  [[ -f .whl/site.tar.xz ]] || missing+=(".whl/site.tar.xz: run 'bash bench/gpu_check.sh --prepare' on the build machine and carry .whl")
  [[ -f .whl/gpu_check/reference.npz ]] || missing+=(".whl/gpu_check/reference.npz: the same --prepare makes it")
  if command -v python3 >/dev/null 2>&1; then
    report=$(DEVICE_PY="$DEVICE_PY" python3 bench/gpu_check_preflight.py) \
      || missing+=("python3: the prerequisite check itself failed to run")
    while IFS= read -r line; do [[ -n "$line" ]] && missing+=("$line"); done <<<"$report"
  fi
  if (( ${#missing[@]} )); then
    echo "gpu_check: missing prerequisites (see this script's header):" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
  fi
}

device() {
  export PYTHONUNBUFFERED=1
  preflight
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  mkdir -p /tmp/site
  tar -xJf .whl/site.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site:$ROOT/server:$ROOT/client"
  # h2load from the carried .deb files: unpacked (no root), run through a wrapper that sets its library path only.
  if ls .whl/debs/*.deb >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    mkdir -p /tmp/h2load && for deb in .whl/debs/*.deb; do dpkg-deb -x "$deb" /tmp/h2load; done
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/h2load/usr/lib/x86_64-linux-gnu exec /tmp/h2load/usr/bin/h2load "$@"\n' > /tmp/h2load/run
    chmod +x /tmp/h2load/run
    if /tmp/h2load/run --version; then export RAGSERVE_H2LOAD=/tmp/h2load/run
    else echo "gpu_check: the carried h2load does not run here (see above): no native load" >&2; fi
  fi
  python3 - <<'EOF'
import sys, sysconfig, pathlib
import numpy, grpc, google.protobuf, tritonclient, structlog, torch, transformers, tokenizers
print(f"python {sys.version.split()[0]} ({sys.executable}); numpy {numpy.__version__}; grpcio {grpc.__version__}; "
      f"protobuf {google.protobuf.__version__}; torch {torch.__version__} (cuda {torch.cuda.is_available()}); "
      f"transformers {transformers.__version__}; tokenizers {tokenizers.__version__}")
libpython = pathlib.Path(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
print(f"libpython for the Triton python-backend stub: {libpython} ({'found' if libpython.exists() else 'MISSING: the stub will not start'})")
# Everything the gateway imports, before anything starts: a package missing here fails in seconds.
import ragserve_server.app, tritonclient.grpc.aio  # noqa: E401,F401
EOF
  local work=/tmp/gpu_check_work
  rm -rf "$work"
  trap 'stop_leftovers '"$work" EXIT
  local status=0
  timeout --signal=TERM --kill-after=20 420 python3 bench/gpu_check.py run --seconds 6 --reference .whl/gpu_check --work "$work" "$@" || status=$?
  # The generation engine on CUDA: greedy against the CPU engine, tokens/s at 1 and 16 streams.
  timeout --signal=TERM --kill-after=20 240 python3 bench/gpu_engine_check.py ${OUT:+--out "$OUT/gpu_engine_check.md"} || status=$?
  return "$status"
}

# Triton runs in its own session: if the check was killed before it stopped it, stop it here.
stop_leftovers() {
  [[ -f "$1/pids" ]] || return 0
  while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$1/pids"
}

cpu_smoke() {
  local pkg=""
  if [[ -d "$STAGE/minilm/pkg" ]]; then pkg="$ROOT/$STAGE/minilm/pkg"; fi  # the weights that travel
  PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" timeout --signal=TERM --kill-after=20 420 \
    .venv/bin/python bench/gpu_check.py run --cpu-smoke --seconds 2 --reference .whl/gpu_check
  timeout --signal=TERM --kill-after=20 240 \
    .venv/bin/python bench/gpu_engine_check.py --cpu-smoke --prompts 4 --tokens 16 --streams 1,4 --decode-tokens 16
}

case "${1:-}" in
  --prepare) prepare ;;
  --cpu-smoke) cpu_smoke ;;
  --preflight) preflight; echo "gpu_check: every prerequisite is here" ;;
  ""|--*) device "$@" ;;  # further flags go to `gpu_check.py run` (e.g. --gateways 1,4 --concurrency 1,64)
  *) echo "usage: bash bench/gpu_check.sh [--prepare | --cpu-smoke | --preflight | gpu_check.py run flags]" >&2; exit 2 ;;
esac
