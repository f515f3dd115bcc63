# The set-up commands of the README: `make serve`, `make test` and `make test-all`.
# Each creates the virtual environment on first use, so a fresh machine needs nothing else.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev
# `make benchmark CIFAR10_DIR=path/to/cifar10-jpeg` for the JPEG copy; keras: the official set (downloaded once)
CIFAR10_DIR ?= keras
PY := $(VENV)/bin/python
# `make test`: unit and fast in-process integration tests; every marker of pyproject.toml is left out
FAST_TESTS := not (slow or server or training or subprocess or lab or container or browser or postgres)
# pytest-xdist workers for `make test` (one per core; `make test TEST_WORKERS=0` runs in one process).
# `make test-all` stays in one process: its real servers and soak checks time themselves.
TEST_WORKERS ?= auto

.PHONY: serve test test-all benchmark

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

serve: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m service

test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "$(FAST_TESTS)"

test-all: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q

benchmark: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m training.benchmark models/shipped/cifar10-airbench --data $(CIFAR10_DIR) --throughput
	$(PY) -m benchmarks.mc_and_http_cost
