"""Documented defaults agree with the code: every ``name`` (value) a method's docstring gives for
one of its params is that param's default in its ``Params``, so a built-in recipe that spells out
a documented default and a rule that omits it behave the same."""
from __future__ import annotations

import json
import re

import pytest

import sparsify.methods  # noqa: F401  (fills the registry)
from sparsify.core.registry import REGISTRY
from sparsify.prepare.schema import schema_path

# ``name`` (literal) or ``name`` (literal, words...): the literal is JSON (numbers, "strings", null, true/false)
DOCUMENTED = re.compile(r"``(\w+)`` \(([^(),:]+)[,)]")


def documented_defaults(method) -> dict:
    out = {}
    fields = method.Params.defaults()
    for name, text in DOCUMENTED.findall(type(method).__doc__ or ""):
        try:
            value = json.loads(text.strip())
        except ValueError:
            continue  # prose ("global" or "layer"), not a default
        if name in fields:
            out[name] = value
    return out


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_docstring_defaults_are_the_params_defaults(name):
    method = REGISTRY[name]
    documented = documented_defaults(method)
    defaults = method.Params.defaults()
    assert {k: defaults[k] for k in documented} == documented


def test_every_method_documents_some_defaults():
    # the check above is not vacuous: each method's docstring lists defaults in the parsed form
    assert all(documented_defaults(m) for m in REGISTRY.values())


def test_builtin_recipe_values_equal_to_a_documented_default_are_the_params_default():
    checked = 0
    for path in sorted(schema_path().parent.glob("*.json")):
        if path.name == schema_path().name:
            continue
        for rule in json.loads(path.read_text())["rules"]:
            if not rule.get("method"):
                continue
            method = REGISTRY[rule["method"]]
            documented, defaults = documented_defaults(method), method.Params.defaults()
            for key, value in rule.get("params", {}).items():
                if key in documented and documented[key] == value:
                    assert defaults[key] == value, f"{path.name}: {rule['method']}.{key}"
                    checked += 1
    assert checked >= 10
