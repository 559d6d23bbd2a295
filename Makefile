# Both entry points create .venv when missing and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: test test-deep test-min demo zoo timm-coverage install clean gpu-check gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg setup.py
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(JOBS) --durations=15 tests

# the property tests with 10x the examples (hypothesis profile "deep", tests/conftest.py)
test-deep: $(STAMP)
	HYPOTHESIS_PROFILE=deep $(BIN)/python -m pytest -q -rs -n $(JOBS) --hypothesis-show-statistics \
		tests/test_properties.py tests/test_method_properties.py

# the whole suite in a separate venv at the lowest torch/torchvision setup.cfg declares
MIN_VENV := .venv-min
MIN_TORCH := $(shell sed -n 's/^ *torch>=\([0-9.]*\).*/\1/p' setup.cfg)
MIN_TORCHVISION := $(shell sed -n 's/^ *torchvision>=\([0-9.]*\).*/\1/p' setup.cfg)
test-min:
	test -x $(MIN_VENV)/bin/python || $(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet "torch==$(MIN_TORCH).*" "torchvision==$(MIN_TORCHVISION).*"
	$(MIN_VENV)/bin/pip install --quiet -e '.[dev]'
	$(MIN_VENV)/bin/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q -rs -n $(JOBS) tests

demo: $(STAMP)
	$(BIN)/sparsify demo --out demo-out

# On a GPU machine (no venv, no internet: the image's python3 with torch): the CUDA cases of the
# test suite, then the GPU check and benchmarks, into $(GPU_OUT) (docs/gpu.md). Wheels in .whl/
# (make gpu-wheels) are installed into $(GPU_SITE) first when present; a python without pip unpacks
# them instead (a wheel is a zip of site-packages), and without them the run goes on (jsonschema is
# optional). GPU_CHECK_ARGS=--dry-run runs it on a CPU.
GPU_OUT ?= $(if $(OUT),$(OUT),gpu-check-out)
GPU_SITE ?= /tmp/site
gpu-check:
	mkdir -p $(GPU_OUT)
	if ls .whl/*.whl >/dev/null 2>&1; then \
		$(PY) -m pip install -q --no-index --no-deps --target $(GPU_SITE) .whl/*.whl \
		|| for w in .whl/*.whl; do $(PY) -m zipfile -e $$w $(GPU_SITE); done \
		|| echo "gpu-check: could not install .whl/ into $(GPU_SITE); going on without it"; fi
	PYTHONPATH=.:$(GPU_SITE):$$PYTHONPATH $(PY) -m pytest -q -rs -p no:cacheprovider tests/test_devices.py -k cuda \
		--junitxml $(GPU_OUT)/pytest.xml > $(GPU_OUT)/pytest.log 2>&1; tests=$$?; cat $(GPU_OUT)/pytest.log; \
	PYTHONPATH=.:$(GPU_SITE):$$PYTHONPATH PYTHONUNBUFFERED=1 $(PY) benchmarks/gpu_check.py --out $(GPU_OUT) $(GPU_CHECK_ARGS); \
	check=$$?; echo "gpu-check: tests exit $$tests, check exit $$check"; test $$tests = 0 -a $$check = 0

# jsonschema (setup.cfg's requirement) and its dependencies as wheels for the GPU image's python
# (CPython 3.12, manylinux x86_64), which has no jsonschema and no internet; a run carries .whl/
GPU_PYTHON ?= 3.12
JSONSCHEMA_REQ := $(shell sed -n 's/^ *\(jsonschema>=[0-9.]*\).*/\1/p' setup.cfg)
gpu-wheels:
	mkdir -p .whl
	$(PY) -m pip download -q --no-cache-dir --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON) --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 -d .whl "$(JSONSCHEMA_REQ)"
	ls .whl

zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo.py --out docs/coverage.md

timm-coverage: $(STAMP)
	$(BIN)/python benchmarks/timm_coverage.py --out docs/coverage-timm.md

clean:
	rm -rf $(VENV) $(MIN_VENV) build *.egg-info .pytest_cache .hypothesis demo-out
