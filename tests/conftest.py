"""Shared test set-up: every test starts from the same random state, and hypothesis runs a
modest, deadline-free profile by default.

Profiles (pick one with ``HYPOTHESIS_PROFILE=<name>``):

* ``default`` — 20 examples per property, no deadline (CPU timings are noisy: the machine is
  shared by parallel workers), ``too_slow`` and ``function_scoped_fixture`` health checks off
  (the autouse seeding fixture below is function-scoped on purpose; properties that need
  randomness per example seed torch from a drawn integer, see ``tests/strategies.py``).
* ``thorough`` / ``deep`` — the same with 200 examples (10x), for a longer run (``make test-deep``).

The number of hypothesis examples run is printed at the end of a session (``count_example`` in
``tests/strategies.py``, summed over xdist workers).

Tests must pass whatever ``torch.get_num_threads()`` is. Under pytest-xdist each worker starts
with ``cpu_count // workers`` threads: with torch's default every worker would run one thread
per core, and OpenMP threads that outnumber the cores spin-wait (the suite took 2.5x as long).
"""
from __future__ import annotations

import gc
import os
import random
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                      HealthCheck.data_too_large])
# the default draws the same examples on every machine, so a fresh clone's `make test` sees what CI
# saw; `make test-deep` explores: ten times the examples, new ones on every run
settings.register_profile("default", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.register_profile("deep", max_examples=200, **_COMMON)  # make test-deep: 10x the default
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SEED = 0

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Seed python, numpy and torch before every test so failures reproduce."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


@pytest.fixture(autouse=True, scope="module")
def _collect_after_module():
    """Free the models a test module built: a traced model sits in a reference cycle (torch.fx's
    GraphModule and its graph), which only the cycle collector frees; between its rare full runs a
    worker's memory grew to 7.9 GB (docs/benchmarks.md#memory)."""
    yield
    gc.collect()


# -- the number of hypothesis examples run, summed over xdist workers ------------------------------

_COUNT_DIR = "SPARSIFY_TEST_EXAMPLE_COUNTS"
_RUN_TMP = "SPARSIFY_TEST_TMPDIR"


def pytest_configure(config):
    """The controller makes one folder for the run's temporary files, and points ``TMPDIR`` at it
    before the xdist workers start: the tests' and doctests' ``mkdtemp`` folders, the subprocesses'
    (CLI, torchrun) and pytest's own ``tmp_path`` land there. It is removed when the run passes,
    and kept, with its path printed, when one fails; without it every run left its folders in /tmp."""
    if hasattr(config, "workerinput") or _RUN_TMP in os.environ:
        return
    import tempfile
    folder = tempfile.mkdtemp(prefix="sparsify-tests-")
    os.environ[_RUN_TMP] = os.environ["TMPDIR"] = tempfile.tempdir = folder  # workers inherit it
    os.environ[_COUNT_DIR] = os.path.join(folder, "example-counts")
    os.mkdir(os.environ[_COUNT_DIR])
    config._sparsify_tmp = folder


def pytest_unconfigure(config):
    folder = getattr(config, "_sparsify_tmp", None)
    if folder is None:
        return
    if getattr(config, "_sparsify_failed", False):
        print(f"\ntemporary files of the failed run kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    session.config._sparsify_failed = exitstatus not in (0, 5)  # 5: no tests collected
    from strategies import examples_run
    folder = os.environ.get(_COUNT_DIR)
    if folder and os.path.isdir(folder):
        worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
        with open(os.path.join(folder, worker), "w") as f:
            f.write(str(examples_run()))


def pytest_terminal_summary(terminalreporter, config):
    folder = os.environ.get(_COUNT_DIR)
    if hasattr(config, "workerinput") or not folder or not os.path.isdir(folder):
        return
    total = sum(int(open(os.path.join(folder, n)).read() or 0) for n in os.listdir(folder))
    if total:
        terminalreporter.write_line(f"hypothesis examples run: {total} (profile {settings.default.max_examples} "
                                    "per property, 4x that for tests/test_method_properties.py)")


DEVICES = ["cpu", "cuda"]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn: ``cpu``, and ``cuda`` where torch sees a GPU (elsewhere the
    CUDA case skips, saying so; ``make gpu-check`` runs them on a GPU machine)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the cuda case runs under `make gpu-check` on a GPU")
    return torch.device(request.param)


@pytest.fixture
def no_jsonschema(monkeypatch):
    """Run as where jsonschema is not installed (the GPU image): its import fails, and the
    once-per-process warning about unchecked recipes is due again."""
    import builtins
    import sparsify.prepare.recipe as recipe_module
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.split(".")[0] == "jsonschema":
            raise ImportError("No module named 'jsonschema'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    monkeypatch.setattr(recipe_module, "_WARNED_UNCHECKED", False)


def pytest_collection_modifyitems(config, items):
    # jsonschema is a dependency, but a GPU image may lack it (docs/gpu.md): recipes then load
    # unchecked with a warning, so only the tests of the schema's own messages cannot run
    import importlib.util
    if importlib.util.find_spec("jsonschema") is None:
        skip = pytest.mark.skip(reason="jsonschema is not installed: recipes are not checked against "
                                       "the schema here (pip install jsonschema, or make gpu-wheels)")
        for item in items:
            if item.get_closest_marker("jsonschema"):
                item.add_marker(skip)


def _compiler_missing() -> str | None:
    for tool in ("c++", "ninja"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH: the direct sparse conv extension cannot be built here"
    return None


@pytest.fixture(scope="module")
def built():
    """The compiled operator (built once per test session, then taken from the build cache).
    A build that fails where the compiler exists is a failure, not a skip."""
    why = _compiler_missing()
    if why:
        print(why)
        pytest.skip(why)
    from sparsify.deploy.accelerate.direct_conv import direct_available
    assert direct_available() is None, direct_available()
