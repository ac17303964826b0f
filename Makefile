# sdserve: `make demo` serves a tiny model on :8080, `make test` runs the fast tests (minutes),
# `make test-all` everything CI runs (every end-to-end check, the browser and the container).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is what tests and the demo need; install it before anything pulls torch
# in, or pip fetches the multi-GB CUDA build. Override for a GPU machine: make TORCH=torch install
TORCH ?= torch==2.13.0
DEMO_MODEL ?= .cache/tiny-sdxl
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all container-test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

$(DEMO_MODEL)/base/model_index.json: | $(STAMP)
	$(BIN)/sdserve tiny-model $(DEMO_MODEL) --kind sdxl-refiner
	$(BIN)/sdserve tiny-model $(DEMO_MODEL)/controls/edges --kind sdxl-controlnet
	$(BIN)/sdserve tiny-model $(DEMO_MODEL)/controls/sketch --kind sdxl-t2i-adapter
	$(BIN)/sdserve tiny-model $(DEMO_MODEL)/controls/style --kind sdxl-ip-adapter

demo: $(STAMP) $(DEMO_MODEL)/base/model_index.json
	$(BIN)/sdserve --model_dir $(DEMO_MODEL) --model_name sdxl --http_port 8080 --grpc_port 8081

# The fast set: everything but the checks marked slow (start-up failures, compile, benches, Ray,
# long load tests) and the container.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Every test, then the container: what CI runs.
test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) container-test

# Builds the Containerfile with podman (CPU torch, local Debian base image) and checks that the
# image serves a tiny model as an arbitrary UID with /mnt/models read-only. Needs root.
container-test: $(STAMP)
	$(BIN)/python -m pytest --container tests/container $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
