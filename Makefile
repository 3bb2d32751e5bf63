# The two set-up commands of the README: `make main` and `make test`.
# Each creates the virtual environment on first use (and again when pyproject.toml changes);
# `make main` installs only what the package needs, `make test` adds the test and tracking extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: main test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so pip never picks a multi-GB CUDA build on CPU machines
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[test,tracking]'
	touch $@

# --overwrite: rerunning the main job replaces its earlier run (runs/smollm2-pipeline)
main: $(STAMP)
	$(VENV)/bin/criteriapo pipeline configs/smollm2-pipeline.yaml --overwrite

test: $(TEST_STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports
