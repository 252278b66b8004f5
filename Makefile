# ragserve: `make run` serves on the embedded default, `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
MINILM_ONNX := model_repository/minilm/1/model.onnx
# What ONNX Runtime runs: the same graph with ONNX Runtime's fused transformer kernels
MINILM_FUSED := model_repository/minilm/1/model_fused.onnx
SMOLLM2_HF := model_repository/smollm2/1/hf/config.json
# MiniLM's per-token vectors (multi-vector Embed, the MaxSim reranker): its own Triton model
MINILM_TOKENS_ONNX := model_repository/minilm_tokens/1/model.onnx
# int8/uint8 embeddings: MiniLM's calibration ranges (scripts/calibrate_embeddings.py)
MINILM_CALIBRATION := model_repository/minilm/1/calibration.json

.PHONY: setup proto models configs engines run test test-unit lint-imports bench loadtest observe clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt client/pyproject.toml server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e ./client -e ./server
	touch $@

# Regenerates the SDK's stubs; tests/test_sdk.py checks they match the protos.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

models: $(MINILM_ONNX) $(MINILM_FUSED) $(SMOLLM2_HF) $(MINILM_CALIBRATION) $(MINILM_TOKENS_ONNX)

# Every config.pbtxt is rendered from server/ragserve_server/models/registry.py (every fact about a
# model lives there); tests/test_registry.py checks the committed CPU configs are up to date.
configs: $(STAMP)
	$(PY) -m ragserve_server.models.repository --device cpu

# The GPU repository for NVIDIA's Triton container: FP16 TensorRT plans built from the same
# ONNX files, each checked against ONNX Runtime, then configs and artifacts. Needs an NVIDIA GPU,
# tensorrt-cu12==10.5.0 in .venv (the TensorRT of nvcr.io/nvidia/tritonserver:24.10-py3, which
# serves the plans; server/ragserve_server/models/gpu_versions.py) and torch with CUDA; see README.
GPU_REPOSITORY ?= build/model_repository_gpu
engines: models
	$(PY) scripts/build_engines.py --out $(GPU_REPOSITORY) \
	  $(if $(RAGSERVE_CROSS_ENCODERS),--cross-encoders $(RAGSERVE_CROSS_ENCODERS)) \
	  $(if $(RAGSERVE_EMBEDDING_MODELS),--embedding-models $(RAGSERVE_EMBEDDING_MODELS))

# The GPU check for a lent GPU machine (bench/gpu_check.sh's header says how to run it there):
# gpu-check-prepare builds what travels (.whl/), gpu-check-smoke runs the same script on this CPU.
.PHONY: gpu-check-prepare gpu-check-smoke
gpu-check-prepare: setup models
	bash bench/gpu_check.sh --prepare
gpu-check-smoke: setup models
	bash bench/gpu_check.sh --cpu-smoke

$(MINILM_ONNX): scripts/export_minilm.py scripts/export_encoder.py scripts/export_common.py $(STAMP)
	$(PY) scripts/export_minilm.py --out $@

$(MINILM_TOKENS_ONNX): scripts/export_multivector.py scripts/export_common.py $(STAMP)
	$(PY) scripts/export_multivector.py --builtin minilm

$(MINILM_FUSED): $(MINILM_ONNX) scripts/fuse_onnx.py
	$(PY) scripts/fuse_onnx.py --builtin minilm

$(MINILM_CALIBRATION): $(MINILM_ONNX) scripts/calibrate_embeddings.py bench/data/relevance.jsonl
	$(PY) scripts/calibrate_embeddings.py --builtin minilm

$(SMOLLM2_HF): scripts/convert_smollm2.py $(STAMP)
	$(PY) scripts/convert_smollm2.py --out $(dir $@)

run: setup models
	$(PY) -m ragserve_server

# A virtualenv over ours with numpy 2, for Triton's python-backend stubs in tests/test_numpy2_stub.py.
NUMPY2 := $(VENV)/numpy2
$(NUMPY2)/.installed: requirements-numpy2.txt scripts/make_numpy2_venv.py $(STAMP)
	$(PY) scripts/make_numpy2_venv.py $(NUMPY2)
	touch $@

# The architecture contracts (.importlinter) first: a broken layer fails in seconds.
lint-imports: setup
	PYTHONPATH=server $(VENV)/bin/lint-imports --no-cache

test: setup models $(NUMPY2)/.installed lint-imports
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests -m "not integration"

# The native load generator of the throughput rows (bench/native_load.py): Debian's nghttp2-client.
.PHONY: h2load
h2load:
	@command -v h2load >/dev/null || apt-get install -y -q nghttp2-client

bench: setup models h2load
	$(PY) bench/embed_bench.py

clean:
	rm -rf $(VENV) build reports $(MINILM_ONNX) $(MINILM_TOKENS_ONNX) $(MINILM_FUSED) $(MINILM_CALIBRATION) model_repository/smollm2/1/hf

# Where an Embed call's CPU goes at concurrency 64: per process and thread, py-spy samples by part, and
# two no-model floors under the same load (echo server; gateway on the fake backend).
.PHONY: profile
profile: setup models h2load
	$(PY) bench/profile_embed.py

# Where a single-sentence call's latency goes at concurrency 1: raw model, Triton direct, gateway.
.PHONY: bench-latency
bench-latency: setup models
	$(PY) bench/latency_ladder.py

# Generate: in-flight batching at 1/4/16 streams vs sequential transformers generate; then the
# ITL of 8 streams while a 1,500-token prompt arrives, chunked prefill on vs off.
.PHONY: bench-generate
bench-generate: setup models
	$(PY) bench/generate_bench.py --long-prompt

# Balancing cost: one gateway over 1 Triton replica vs over 2, side by side.
.PHONY: bench-replicas
bench-replicas: setup models
	$(PY) bench/replicas_bench.py

# Priorities: interactive Embed p50/p99 while a bulk EmbedStream saturates, two lanes vs one.
.PHONY: bench-priority bench-soak
bench-priority: setup models
	$(PY) bench/priority_bench.py

# A bounded soak of mixed load: RSS at the start and the end, counts of every status code.
SOAK_MINUTES ?= 10
bench-soak: setup models
	$(PY) bench/soak_bench.py --minutes $(SOAK_MINUTES) --generate

# DoS: interactive p99 while unauthenticated 30 MiB bodies, 100k-character stop strings and
# 600 slow HTTP connections arrive (loopback, bounded, stops by itself).
.PHONY: bench-dos
bench-dos: setup models
	$(PY) bench/dos_bench.py

# Rerank: quality on bench/data/relevance.jsonl next to BM25, and 1000-document Rerank vs Embed.
.PHONY: bench-rerank
bench-rerank: setup models
	$(PY) bench/rerank_bench.py

# A cross-encoder of your own (a single-logit AutoModelForSequenceClassification folder), then serve it:
#   make models CROSS_ENCODER_HF=~/ms-marco-MiniLM-L-6-v2 CROSS_ENCODER_NAME=msmarco-minilm
#   RAGSERVE_CROSS_ENCODERS=msmarco-minilm=model_repository/msmarco-minilm make run
CROSS_ENCODER_NAME ?= cross-encoder
ifneq ($(CROSS_ENCODER_HF),)
models: model_repository/$(CROSS_ENCODER_NAME)/1/model.onnx
model_repository/$(CROSS_ENCODER_NAME)/1/model.onnx: scripts/export_cross_encoder.py scripts/export_common.py $(STAMP)
	$(PY) scripts/export_cross_encoder.py --hf-folder $(CROSS_ENCODER_HF) --out model_repository/$(CROSS_ENCODER_NAME)
endif

# Observability: the Debian Prometheus server (the Prometheus integration test needs it too).
# `make observe` runs it in the foreground on 127.0.0.1:$(PROMETHEUS_PORT), scraping a stack
# started by `make run` (gateway metrics and Triton's metrics port).
PROMETHEUS_PORT ?= 9090
GATEWAY_METRICS ?= 127.0.0.1:9000
GATEWAY_WORKERS ?= 1
TRITON_METRICS ?= 127.0.0.1:8002
.PHONY: prometheus
test: prometheus
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

observe: setup prometheus
	$(PY) scripts/prometheus_config.py --gateway $(GATEWAY_METRICS) --gateway-workers $(GATEWAY_WORKERS) --triton $(TRITON_METRICS) --out build/prometheus/prometheus.yml
	prometheus --config.file=build/prometheus/prometheus.yml --storage.tsdb.path=build/prometheus/data \
	  --web.listen-address=127.0.0.1:$(PROMETHEUS_PORT)

# Load test of a running stack (`make run` in another terminal): bounded users and time,
# CSV + HTML reports under reports/, exit code 1 on any failed call or a missed SLO.
RAGSERVE_ADDRESS ?= 127.0.0.1:50051
LOADTEST_USERS ?= 4
LOADTEST_TIME ?= 60s
loadtest: setup
	mkdir -p reports
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless --host $(RAGSERVE_ADDRESS) \
	  -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) -t $(LOADTEST_TIME) --stop-timeout 60 \
	  --csv reports/loadtest --html reports/loadtest.html --only-summary

# The same Embed load over gRPC and over HTTP (/v1/embeddings), tracing off and on (cost < 5 % is the goal).
.PHONY: bench-http
bench-http: setup models
	$(PY) bench/http_bench.py
