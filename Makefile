# ragserve: `make run` serves on the embedded default, `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
MINILM_ONNX := model_repository/minilm/1/model.onnx
SMOLLM2_HF := model_repository/smollm2/1/hf/config.json
PROTOS := $(wildcard proto/ragserve/v1/*.proto)

.PHONY: setup proto models run test test-unit bench loadtest observe clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt client/pyproject.toml server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e ./client -e ./server
	touch $@

# Regenerates the SDK's stubs; tests/test_proto_up_to_date.py checks they match the protos.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

models: $(MINILM_ONNX) $(SMOLLM2_HF)

$(MINILM_ONNX): scripts/export_minilm.py $(STAMP)
	$(PY) scripts/export_minilm.py --out $@

$(SMOLLM2_HF): scripts/convert_smollm2.py $(STAMP)
	$(PY) scripts/convert_smollm2.py --out $(dir $@)

run: setup models
	$(PY) -m ragserve_server

test: setup models
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests -m "not integration"

bench: setup models
	$(PY) bench/embed_bench.py

clean:
	rm -rf $(VENV) build reports $(MINILM_ONNX) model_repository/smollm2/1/hf

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
model_repository/$(CROSS_ENCODER_NAME)/1/model.onnx: scripts/export_cross_encoder.py $(STAMP)
	$(PY) scripts/export_cross_encoder.py --hf-folder $(CROSS_ENCODER_HF) --out model_repository/$(CROSS_ENCODER_NAME)
endif
