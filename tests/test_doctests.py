"""The examples in the docstrings of passes/ and sparsify/ stay true: each module's doctests run here."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest

import passes
import sparsify


def _modules(package) -> list[str]:
    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules(passes) + _modules(sparsify)


def test_every_module_is_collected():
    assert {"passes.tracing", "passes.select", "sparsify.api", "sparsify.prepare.recipe", "sparsify.methods.st3",
            "sparsify.core.threshold", "sparsify.core.schedules"} <= set(MODULES)


# modules whose examples show the recipe schema's messages (they skip, saying so, without jsonschema)
SCHEMA_EXAMPLES = {"sparsify.prepare.recipe"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.jsonschema) if n in SCHEMA_EXAMPLES else n
                                  for n in MODULES])
def test_doctests(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] not in ("passes", "sparsify"):
            # integrations of optional third-party packages (transformers, lightning)
            pytest.skip(f"{name} needs the optional package {e.name!r}, which is not installed")
        raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # examples may warn (e.g. rules matching nothing)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                                 verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name} (see stdout)"
