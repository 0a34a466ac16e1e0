# TensorGuard: `make demo` shows the agent running, `make test` runs everything CI runs.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test deps venv bpf lint unit integration e2e debs check-units docs clean

demo: deps venv bpf
	packaging/demo

test: deps venv bpf lint debs
	packaging/check-units
	TG_REQUIRE_E2E=1 $(BIN)/pytest -p no:cacheprovider tests

deps:
	packaging/install-deps

venv: $(STAMP)

$(STAMP): pyproject.toml packaging/requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r packaging/requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

lint: venv
	$(BIN)/ruff check agent tests packaging/gen-docs
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit

integration: venv
	$(BIN)/pytest tests/integration

e2e: venv debs
	TG_REQUIRE_E2E=1 $(BIN)/pytest tests/e2e

bpf:
	$(MAKE) -C bpf

debs:
	packaging/build-debs

docs: venv
	$(BIN)/python packaging/gen-docs

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .hypothesis
	$(MAKE) -C bpf clean
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
