# The README's commands. `make setup` once, then `make test`; `make demo` sets up and runs the demo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint bench-vectors demo lock

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
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# The edit loop: everything but the tests marked slow (each over ~1 s: model training, subprocess CLIs, the
# browser, worker kills). Under a minute on 2 cores; CI runs `make test`, which runs them all.
test-fast:
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

bench-vectors:
	$(BIN)/python bench/vector_search.py

# Sample collection (~300 images), three attributes indexed, API + page on 127.0.0.1:$(DEMO_PORT) (Ctrl-C stops).
# DEMO_ARGS=--check stops after printing the example queries (a smoke run).
DEMO_PORT ?= 8000
demo: $(BIN)/omniattr
	DEMO_PORT=$(DEMO_PORT) $(BIN)/python scripts/demo.py $(DEMO_ARGS)

$(BIN)/omniattr:
	$(MAKE) setup

# Re-pin docker/requirements.txt (the images' dependency lock) from this venv after changing dependencies.
lock:
	$(BIN)/python scripts/lock_requirements.py
