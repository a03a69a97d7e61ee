# pefttune: two commands do all on a fresh machine.
#   make run   -> set up .venv (idempotent) and run the embedded default study
#   make test  -> set up .venv (idempotent) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pefttune-installed

.PHONY: setup run test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/pefttune run

test: setup
	# two processes, each taking whole test files (the machine's 2 cores; benchmarks/README.md, "The test suite")
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV)
