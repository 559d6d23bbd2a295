"""The recipe JSON Schema: the shipped ``sparsify/recipes/recipe.schema.json`` with every method's
part generated from its typed params (:mod:`sparsify.core.params`).

The hand-written part (top-level keys, ``match``, ``stages``, ``options``) stays in the JSON
file; :func:`generated_schema` fills in the ``schedule`` keys (every method's time params), the
``method`` names and, per method, the ``params`` object, so editors complete and check the keys
of a rule's ``params`` once its ``method`` is set. After changing a method's params run::

    python -m sparsify.prepare.schema

(tests/test_validation.py fails while the shipped file differs from the generated one).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from sparsify.methods import REGISTRY

__all__ = ["generated_schema", "schema_path", "write_schema"]


def schema_path() -> Path:
    """Where the shipped recipe schema is: ``sparsify/recipes/recipe.schema.json`` of this
    installation (what :func:`generated_schema` starts from and :func:`write_schema` overwrites).

    >>> schema_path().name, schema_path().is_file()
    ('recipe.schema.json', True)
    """
    return Path(__file__).resolve().parent.parent / "recipes" / "recipe.schema.json"


def generated_schema(base: dict | None = None) -> dict:
    """``base`` (default: the shipped schema) with the methods' parts regenerated.

    >>> s = generated_schema()
    >>> s["$defs"]["params_st3"]["properties"]["sparsity"]["exclusiveMaximum"]
    1
    >>> sorted(s["properties"]["schedule"]["properties"])
    ['begin', 'end', 'fix']
    """
    schema = copy.deepcopy(base if base is not None else json.loads(schema_path().read_text()))
    defs = {k: v for k, v in schema.get("$defs", {}).items() if not k.startswith("params_")}
    times: dict[str, dict] = {}
    branches = []
    for name in sorted(REGISTRY):
        method = REGISTRY[name]
        params = method.Params.json_schema()
        params["description"] = method.description
        defs[f"params_{name}"] = params
        for key in method.schedule_keys:
            # one block for every method: what null means is each method's own (its params_<name>)
            times.setdefault(key, {"$ref": "#/$defs/time", "description": (
                f"The {key} of every rule whose method has one and does not set it; what null means is the "
                "method's (see its params).")})
        branches.append({"if": {"properties": {"method": {"const": name}}, "required": ["method"]},
                         "then": {"properties": {"params": {"$ref": f"#/$defs/params_{name}"}}}})
    schema["$defs"] = defs
    schedule = schema["properties"]["schedule"]
    schedule["properties"] = {k: times[k] for k in sorted(times)}
    schedule["additionalProperties"] = False
    rule = schema["properties"]["rules"]["items"]
    rule["properties"]["method"] = {
        "enum": sorted(REGISTRY) + [None],
        "description": "A registered method name, or null to leave the matched nodes dense."}
    rule["allOf"] = branches
    return schema


def write_schema(path: Path | None = None) -> Path:
    """Write the generated schema to ``path`` (default: the shipped file); returns the path."""
    path = path or schema_path()
    path.write_text(json.dumps(generated_schema(), indent=2, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    print(f"wrote {write_schema()}")
