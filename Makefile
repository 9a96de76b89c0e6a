# The README's commands. `make setup` once, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint bench-vectors

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel the project is tested with; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@if [ -d tests/fixtures/example_generator_plugin ]; then \
		$(BIN)/pip install --quiet --no-deps --no-build-isolation -e tests/fixtures/example_generator_plugin; fi

lint:
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench-vectors:
	$(BIN)/python bench/vector_search.py
