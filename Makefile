# Everything a fresh machine needs: `make test` and `make demo` create .venv and install the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-lm bench bench-dist bench-swin lint gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so the project's torch>=2.4 is already met (no CUDA download).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench,demo,transformers]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/flexmoe demo

demo-lm: $(STAMP)
	$(BIN)/flexmoe lm

bench: $(STAMP)
	$(BIN)/flexmoe bench layer

bench-dist: $(STAMP)
	$(BIN)/torchrun --standalone --nproc-per-node 2 -m flexmoe.cli bench dist
	$(BIN)/torchrun --standalone --nproc-per-node 4 -m flexmoe.cli bench dist

bench-swin: $(STAMP)
	$(BIN)/flexmoe bench swin

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
