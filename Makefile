# Two commands on a fresh machine: `make run` and `make test`. Both set themselves up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= cpu-demo
CONFIG ?= configs/$(PROFILE).yaml
PDFS   ?=
ARGS   ?=
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REGISTRY ?= ghcr.io/doctune

export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps run test compile lint config-docs bench images push-images clean

setup: $(STAMP)

# torch is pinned in the same pip command as everything else, so pip takes the CPU wheel here.
$(STAMP): pyproject.toml requirements/lock.txt
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c requirements/lock.txt -e ".[dev,serve]" torch==2.13.0
	touch $(STAMP)

# OCR for image-only pages: Debian's tesseract where we can install it; ingest flags such pages otherwise.
system-deps:
	@if command -v tesseract >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null) \
	  || echo "note: could not install tesseract-ocr; image-only pages will be flagged, not OCR'd"; \
	else echo "note: tesseract-ocr is not installed; image-only pages will be flagged, not OCR'd"; fi

run: $(STAMP)
	$(BIN)/doctune run --config $(CONFIG) $(if $(PDFS),--pdfs $(PDFS)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

compile: $(STAMP)
	$(BIN)/doctune compile

# configs/default.yaml and docs/config.md, generated from the config schema (src/doctune/config/), and the reference
# InferenceService of `doctune deploy`'s defaults (manifests/base/serving/); tests check them.
config-docs: $(STAMP)
	$(BIN)/python -m doctune.config.reference
	$(BIN)/python -m doctune.cluster.inference_service

lint: $(STAMP)
	$(BIN)/ruff check src components pipelines tests bench conftest.py
	$(BIN)/ruff format --check src components pipelines tests bench conftest.py
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/ingest_bench.py
	$(BIN)/python bench/synth_bench.py
	$(BIN)/python bench/retriever_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/quantize_bench.py
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/gate_bench.py
	$(BIN)/python bench/gpu_train_bench.py
	$(BIN)/python bench/vlm_train_bench.py
	$(BIN)/python bench/pipeline_bench.py $(if $(WORKDIR),--workdir $(WORKDIR))
	$(BIN)/python bench/report.py

# Container images for the cluster (images/), tagged with the package version; needs a running docker engine.
images:
	@docker info >/dev/null 2>&1 || { echo "make images needs a running docker engine; none answers here" >&2; exit 1; }
	docker build -f images/cpu/Dockerfile -t $(REGISTRY)/doctune-cpu:$(VERSION) \
	  --build-arg DOCTUNE_GIT_COMMIT=$$(git rev-parse HEAD) .
	docker build -f images/cuda/Dockerfile -t $(REGISTRY)/doctune-cuda:$(VERSION) \
	  --build-arg DOCTUNE_GIT_COMMIT=$$(git rev-parse HEAD) .

push-images: images
	docker push $(REGISTRY)/doctune-cpu:$(VERSION)
	docker push $(REGISTRY)/doctune-cuda:$(VERSION)

clean:
	rm -rf $(VENV) .doctune .pytest_cache .ruff_cache
