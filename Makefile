# TensorGuard: `make demo` shows the agent running, `make test` runs everything CI runs.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test deps venv bpf tlsfront lint unit integration e2e debs check-units docs clean

demo: deps venv bpf tlsfront
	packaging/demo

test: deps venv bpf tlsfront lint debs
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

# The control plane's TLS front end (Rust), built offline from Debian's packaged crates with Debian's
# toolchain (/usr/bin first: a rustup toolchain elsewhere on PATH is newer than what the .deb builds with);
# installed beside the venv's python, where `tensorguard server serve` looks for it.
CARGO := env PATH=/usr/sbin:/usr/bin:/sbin:/bin cargo
tlsfront: venv
	cd tlsfront && $(CARGO) build --release --offline --quiet && $(CARGO) test --release --offline --quiet
	install -m 0755 tlsfront/target/release/tensorguard-tlsfront $(BIN)/tensorguard-tlsfront

debs:
	packaging/build-debs

docs: venv
	$(BIN)/python packaging/gen-docs
	PYTHONPATH=agent $(BIN)/python packaging/gen-completions packaging/completions

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .hypothesis tlsfront/target
	$(MAKE) -C bpf clean
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
