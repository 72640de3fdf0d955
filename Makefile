# The two set-up commands of the README: `make demo` and `make test`. Each creates the
# virtual environment and installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch when this version lies on the machine's disk; on GPU machines set
# TORCH='torch==2.13.0' --index-url … or preinstall torch, pip then keeps it.
TORCH ?= torch==2.13.0
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test lint format fault clean

$(BASE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	@command -v java >/dev/null || { echo "installing a Java runtime for the Spark readability test"; \
		apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null; }
	touch $@

demo: $(BASE_STAMP)
	$(VENV)/bin/raycaption demo

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check lib jobs tests bench
	$(VENV)/bin/ruff format --check lib jobs tests bench

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format lib jobs tests bench
	$(VENV)/bin/ruff check --fix lib jobs tests bench

test: lint
	$(PY) -m pytest

fault: $(TEST_STAMP)
	$(PY) -m pytest -m fault

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
