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

# The seed example through the service, as a user runs it: `up --sandbox` starts Ray,
# the orchestrator, the REST API on 127.0.0.1:9090 and the sandbox (UpCloud emulator,
# moto EC2, SSH endpoint); `submit --wait` sends the Nickel file over REST and follows
# it live; `stats` sums up. Everything stays up afterwards; the last line says how to
# stop it. A fresh data dir every time (a previous demo is stopped first).
demo: setup
	-$(PROV) down --data-dir $(DEMO_DATA_DIR) >/dev/null 2>&1
	rm -rf $(DEMO_DATA_DIR)
	$(PROV) up --sandbox --data-dir $(DEMO_DATA_DIR)
	PROVISIONING_DATA_DIR=$(DEMO_DATA_DIR) $(PROV) batch submit workflows/example_batch.ncl --wait
	PROVISIONING_DATA_DIR=$(DEMO_DATA_DIR) $(PROV) batch stats
	@echo
	@echo "The orchestrator is still running: API http://127.0.0.1:9090, Ray dashboard in the lines above."
	@echo "Try: PROVISIONING_DATA_DIR=$(DEMO_DATA_DIR) $(PROV) batch list"
	@echo "Stop it with: $(PROV) down --data-dir $(DEMO_DATA_DIR)"

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
