# Both entry points create .venv when missing and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: test demo zoo install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg setup.py
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(JOBS) --durations=15 tests

demo: $(STAMP)
	$(BIN)/sparsify demo --out demo-out

zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo.py --out docs/coverage.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis demo-out
