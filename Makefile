# The two commands of the README: `make demo` and `make test`. Both create the
# virtualenv and install the project first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-integration bench device-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tagstream up

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/tagstream bench
	$(VENV)/bin/tagstream bench --overload
	$(VENV)/bin/tagstream bench --models

# On a machine with an NVIDIA GPU: the GPU tests and figures into OUT (scripts/device_check.sh).
OUT ?= device-check
device-check:
	scripts/device_check.sh $(OUT)

# Style, and the one-way layers of docs/architecture.md (import-linter, pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .tagstream .pytest_cache
