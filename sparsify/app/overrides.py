"""``--set key=value`` overrides of recipe parameters, as the command line gives them."""
from __future__ import annotations

import json

__all__ = ["parse_overrides"]


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a recipe can use (finite numbers only)")


def parse_overrides(items: list[str] | None) -> dict:
    """``["sparsity=0.95", "sigma=true", "name=x"]`` -> ``{"sparsity": 0.95, "sigma": True, "name": "x"}``:
    values are parsed as JSON, falling back to the plain string.

    >>> parse_overrides(["sparsity=0.95", "fix=null", "rule=abc"])
    {'sparsity': 0.95, 'fix': None, 'rule': 'abc'}
    """
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes key=value (e.g. --set sparsity=0.95), got {item!r}")
        try:
            out[key.strip()] = json.loads(value, parse_constant=_no_constant)
        except json.JSONDecodeError:
            out[key.strip()] = value
        except ValueError as e:
            raise ValueError(f"--set {item}: {e}") from None
    return out
