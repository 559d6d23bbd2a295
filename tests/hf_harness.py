"""For tests that need transformers: skip the importing test module (with the reason printed)
when it is absent, else load benchmarks/transformers_coverage.py (tiny configs of every family,
the end-to-end harness) as ``cov``."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

if importlib.util.find_spec("transformers") is None:
    print("skipping: transformers is not installed (pip install fx-sparsify[integrations])")
    pytest.skip("transformers is not installed (pip install fx-sparsify[integrations])", allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "transformers_coverage", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "transformers_coverage.py")
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)
