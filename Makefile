# The README's two commands are `make demo` and `make test`; everything else supports them.
VENV ?= .venv
PY := $(VENV)/bin/python
PROV := $(VENV)/bin/provisioning
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint typecheck unit integration e2e bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

DEMO_DATA_DIR ?= $(CURDIR)/data/demo

# The seed example end to end in the sandbox: 2 servers on the UpCloud emulator, then
# containerd, kubernetes and cilium on each over SSH. A fresh data dir every time.
demo: setup
	rm -rf $(DEMO_DATA_DIR)
	$(PROV) batch validate workflows/example_batch.ncl
	$(PROV) batch plan workflows/example_batch.ncl
	$(PROV) batch run workflows/example_batch.ncl --sandbox --data-dir $(DEMO_DATA_DIR)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest

unit: setup
	$(VENV)/bin/pytest tests/unit

integration: setup
	$(VENV)/bin/pytest tests/integration

e2e: setup
	$(VENV)/bin/pytest tests/e2e

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench all

bench-quick: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
