"""Recipes: loading (built-in name, JSON path or dict), schema validation, parameter resolution.

A recipe is data, never code. Errors name the file, line and column for malformed JSON and the
JSON path (``$.rules[1].match.typ``) for anything the schema or a method rejects.
"""
from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sparsify.core.schedules import plain_number
from sparsify.methods import REGISTRY, get_method
# ReadOnlyDict / ReadOnlyList: pickles of a Recipe made before they moved name them here
from sparsify.prepare.read_only import ReadOnlyDict, ReadOnlyList, editable, read_only  # noqa: F401
from sparsify.prepare.schema import generated_schema
from sparsify.prepare.validate import (RecipeError, check_duplicates, check_finite, check_ranges, check_time_values,
                                       json_path, loads_strict)

__all__ = ["RecipeError", "Rule", "Recipe", "load_recipe", "builtin_recipes", "schema"]


@dataclass(frozen=True)
class Rule:
    """One rule after resolution: ``params`` holds every parameter of its method. Read-only
    (``match`` and ``params`` too): ``sparsify`` builds from the recipe's JSON, so an edit here
    would be ignored; it raises instead.

    >>> load_recipe("st3").rules[0].params["sparsity"] = 0.5
    Traceback (most recent call last):
    ...
    TypeError: a loaded recipe is read-only (sparsify builds from the recipe's JSON, recipe.data): set a parameter with an override, load_recipe(spec, sparsity=0.8) or sparsify(model, recipe, sparsity=0.8), or edit a copy, copy.deepcopy(recipe.data), and pass that
    """

    index: int
    match: dict
    method: str | None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "match", read_only(self.match))
        object.__setattr__(self, "params", read_only(self.params))

    @property
    def path(self) -> str:
        return f"$.rules[{self.index}]"


@dataclass(frozen=True)
class Recipe:
    """A validated recipe with overrides applied. ``data`` is the resolved JSON document, what
    ``sparsify`` builds from, read-only as the rules are (an edit would make the two disagree);
    the other fields are read-only views of it. ``copy.deepcopy(recipe.data)`` is an editable copy
    (a deep copy of the recipe itself is the recipe: nothing in it changes).

    >>> recipe = load_recipe("st3")
    >>> recipe.data["rules"][0]["params"]["sparsity"] = 0.5
    Traceback (most recent call last):
    ...
    TypeError: a loaded recipe is read-only (sparsify builds from the recipe's JSON, recipe.data): set a parameter with an override, load_recipe(spec, sparsity=0.8) or sparsify(model, recipe, sparsity=0.8), or edit a copy, copy.deepcopy(recipe.data), and pass that
    """

    name: str
    description: str
    source: str
    data: dict
    rules: tuple[Rule, ...]
    #: the parameters the call's overrides set (error messages name them)
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "data", read_only(self.data))

    def __deepcopy__(self, memo):  # read-only all through: the copy would equal it in every way
        return self

    @property
    def options(self) -> dict:
        return self.data.get("options", {})

    @property
    def stages(self) -> list[dict]:
        # plain copies: the groups keep them (a model's state holds no type of this layer's)
        return editable(self.data.get("stages", []))

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True)


def _recipe_dir():
    return resources.files("sparsify") / "recipes"


def schema() -> dict:
    """The recipe JSON Schema shipped as ``sparsify/recipes/recipe.schema.json``."""
    return json.loads((_recipe_dir() / "recipe.schema.json").read_text())


_CURRENT: dict = {}  # the registry as it was -> its validator (one entry)


def _validator():
    """A validator of :func:`schema` with the parts of the methods registered now
    (:func:`~sparsify.prepare.schema.generated_schema`): a method registered outside the library has
    its time params in the ``schedule`` block too. Made again when the registry changes."""
    import jsonschema
    key = tuple(REGISTRY.items())
    if key not in _CURRENT:
        _CURRENT.clear()
        _CURRENT[key] = jsonschema.Draft202012Validator(generated_schema(schema()))
    return _CURRENT[key]


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions.

    >>> "st3" in builtin_recipes()
    True
    """
    out = {}
    for entry in sorted(_recipe_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json") and entry.name != "recipe.schema.json":
            out[entry.name[:-5]] = json.loads(entry.read_text()).get("description", "")
    return out


def _parse(text: str, source: str) -> Any:
    try:
        data = loads_strict(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{source}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except RecursionError:
        raise RecipeError(f"{source}: JSON nested too deeply to be a recipe") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise RecipeError(f"{source}: {e}") from None
    _raise(source, check_duplicates(data))
    return data


def _raise(source: str, problems: list[tuple[list, str]], note: str = "") -> None:
    if problems:
        raise _invalid(source + ": invalid recipe" + note, [f"{json_path(path)}: {msg}" for path, msg in problems[:5]])


def _invalid(head: str, lines: list[str]) -> RecipeError:
    """One problem on one line; several, one a line under ``head``."""
    return RecipeError(f"{head}: {lines[0]}" if len(lines) == 1 else f"{head}:\n  " + "\n  ".join(lines))


def _checked_elsewhere(path: list) -> bool:
    # a rule's method and params get the method's own messages (unknown method, unknown or bad
    # param) once the call's overrides are in: the schema's copy of them is for editors
    return len(path) >= 3 and path[0] == "rules" and path[2] in ("method", "params")


def _plain(data):
    """A recipe given as a dict, with numpy / torch numbers as Python's (the schema and the stored JSON
    know only those)."""
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return plain_number(data)


def _read(spec) -> tuple[dict, str]:
    if isinstance(spec, Recipe):  # load_recipe's result: its resolved document, loaded again
        return editable(spec.data), spec.source
    if isinstance(spec, dict):
        return _plain(copy.deepcopy(spec)), "<dict>"
    if isinstance(spec, str) and spec.lstrip().startswith(("{", "[")):
        # checked first: a JSON text holding a "/" would otherwise be taken for a path
        shown = spec.strip()[:30] + ("..." if len(spec.strip()) > 30 else "")
        raise RecipeError(f"recipe {shown!r} is a JSON text, not a recipe name or path: pass json.loads(text) "
                          "(a dict) or the path of a .json file")
    if isinstance(spec, Path) or (isinstance(spec, str) and (spec.endswith(".json") or "/" in spec)):
        path = Path(spec)
        if path.is_dir():
            raise RecipeError(f"recipe file {str(path)!r} is a folder (give the path of a .json file)")
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte order mark, as Windows editors write it
        except UnicodeDecodeError as e:
            raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the recipe as UTF-8 "
                              "JSON") from None
        except OSError as e:
            raise RecipeError(f"recipe file {str(path)!r} cannot be read ({e.strerror})") from None
        return _parse(text, str(path)), str(path)
    if isinstance(spec, str):
        known = builtin_recipes()
        if spec not in known and (Path(spec).is_file() or Path(spec).is_dir()):  # a file named without .json
            return _read(Path(spec))  # or a folder: said as one, not an unknown name
        if spec not in known:
            raise RecipeError(f"unknown recipe {spec!r}{_did_you_mean(spec, known)}; built-in recipes: "
                              f"{', '.join(known)} (or a path to a .json file; from Python, also a dict)")
        entry = _recipe_dir() / f"{spec}.json"
        return _parse(entry.read_text(), f"<built-in {spec}>"), f"built-in:{spec}"
    raise RecipeError(f"a recipe is a built-in name, a path to a JSON file, or a dict (or the Recipe load_recipe "
                      f"returns); got {type(spec).__name__}")


_WARNED_UNCHECKED = False


def _validate_schema(data, source: str) -> None:
    _raise(source, check_finite(data))
    try:  # imported here: the library works without it (GPU images often lack it), unchecked
        import jsonschema
    except ImportError:
        global _WARNED_UNCHECKED
        if not _WARNED_UNCHECKED:  # the same for every recipe: said once per process
            _WARNED_UNCHECKED = True
            import warnings
            warnings.warn(f"{source}: recipes are not checked against recipe.schema.json: jsonschema is not "
                          "installed (pip install jsonschema); the methods' own parameter checks still run",
                          stacklevel=3)
        return
    validator = _validator()
    errors = sorted((e for e in validator.iter_errors(data) if not _checked_elsewhere(list(e.absolute_path))),
                    key=lambda e: (list(e.absolute_path), e.message))
    if not errors:
        return
    lines = []
    for err in errors:
        path = list(err.absolute_path)
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {}))) \
            if err.validator == "additionalProperties" else []
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        # every misspelt key at once: fixing them one error message at a time is a slow loop
        lines += [f"{json_path(path + [key])}: unknown key {key!r} (allowed here: {allowed})" for key in extra] \
            or [f"{json_path(path)}: {_schema_message(err, path)}"]
    shown = lines[:8]
    if len(lines) > len(shown):
        shown.append(f"... ({len(lines) - len(shown)} more)")
    raise _invalid(f"{source}: invalid recipe", shown)


# what a match key holding names expects, in words (the schema says only "a string or an array")
_NAMES = {"type": "a module class name (Conv2d) or a list of class names",
          "op": "a functional op name (relu) or a list of op names",
          "name": "a qualified-name glob (layer1.*) or a list of globs",
          "not_name": "a qualified-name glob (layer1.*) or a list of globs"}


def _schema_message(err, path: list) -> str:
    """jsonschema's message, except where it names no expectation ("3 is not valid under any of
    the given schemas"): then what the field takes."""
    if err.validator not in ("oneOf", "anyOf"):
        return err.message
    if len(path) >= 2 and path[-2] == "match" and path[-1] in _NAMES:
        return f"must be {_NAMES[path[-1]]}, got {err.instance!r}"
    kinds = [f"{sub.get('type')}" for sub in err.validator_value if isinstance(sub, dict) and "type" in sub]
    return f"must be one of: {', '.join(kinds)}; got {err.instance!r}" if kinds else err.message


def _resolve_params(index: int, raw: dict, schedule: dict, source: str) -> dict | None:
    """Every parameter of rule ``index``'s method (None for a ``"method": null`` rule)."""
    method_name = raw["method"]
    path = f"$.rules[{index}]"
    if method_name is not None and not isinstance(method_name, str):  # a list is unhashable: before REGISTRY
        raise RecipeError(f"{source}: {path}.method: must be a method name (a string) or null, got "
                          f"{type(method_name).__name__} {method_name!r}; known methods: {', '.join(sorted(REGISTRY))}")
    if method_name is None:
        if raw.get("params"):  # silently ignored, a typo (a method meant) would go unseen
            raise RecipeError(f"{source}: {path}.params: a rule with \"method\": null leaves the layers it matches "
                              "dense and takes no params; remove params or name a method")
        return None
    if method_name not in REGISTRY:
        raise RecipeError(f"{source}: {path}.method: unknown method {method_name!r}"
                          f"{_did_you_mean(method_name, REGISTRY)}; "
                          f"known methods: {', '.join(sorted(REGISTRY))}")
    method = get_method(method_name)
    params = dict(method.params)
    for key in method.schedule_keys:
        if key in schedule:
            params[key] = schedule[key]
    if not isinstance(raw.get("params", {}), dict):
        raise RecipeError(f"{source}: {path}.params: must be an object of parameter values, got "
                          f"{type(raw['params']).__name__}")
    unknown = [key for key in raw.get("params", {}) if key not in method.params]
    if unknown:  # every one named, as for unknown recipe and rule keys
        keys = ", ".join(f"{path}.params.{key}" for key in unknown)
        raise RecipeError(f"{source}: {keys}: unknown parameter{'s' if len(unknown) > 1 else ''} of method "
                          f"{method_name!r}; " + (f"its parameters: {', '.join(sorted(method.params))}"
                                                  if method.params else "it takes none"))
    for key, value in raw.get("params", {}).items():
        params[key] = value
    return params


def _did_you_mean(name: str, known) -> str:
    """`` (did you mean 'sas'?)`` for a name that differs from a known one in case or by a typo.

    >>> _did_you_mean("SAS", ["sas", "st3"]), _did_you_mean("st-3", ["sas", "st3"]), _did_you_mean("x", ["sas"])
    (" (did you mean 'sas'?)", " (did you mean 'st3'?)", '')
    """
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    key = name.lower() if name.lower() in by_lower else (close[0] if close else None)
    return f" (did you mean {by_lower[key]!r}?)" if key else ""


#: sparsify()'s own keywords: a misspelt one arrives among the overrides (did you mean ...?)
CALL_KEYWORDS = ("example_inputs", "total_steps", "inplace", "copy", "capture")


def load_recipe(spec, **overrides) -> Recipe:
    """Load, validate and resolve a recipe; ``overrides`` set a parameter in every rule whose
    method has it (and the schedule block). ``spec`` is a built-in name, a path to a JSON file, a
    dict, or a :class:`Recipe` (this function's result: ``overrides`` then apply on top of it).
    Numbers may be numpy's or 0-dim tensors: they are stored as Python's.

    >>> r = load_recipe("st3", sparsity=0.95)
    >>> r.rules[0].params["sparsity"]
    0.95
    >>> load_recipe({"version": 1, "rules": [{"match": {"typ": "Conv2d"}, "method": "st3"}]})
    Traceback (most recent call last):
    ...
    sparsify.core.errors.RecipeError: <dict>: invalid recipe: $.rules[0].match.typ: unknown key 'typ' (allowed here: depthwise, first, grouped, in_channels, kernel_size, last, name, not_name, op, out_channels, type)
    """
    data, source = _read(spec)
    overrides = {k: plain_number(v) for k, v in overrides.items()}  # np.int64(5) is the step 5
    given = tuple(sorted(set(overrides) | set(spec.overrides if isinstance(spec, Recipe) else ())))
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a JSON object, got {type(data).__name__}")
    _validate_schema(data, source)
    schedule = dict(data.get("schedule", {}))
    for key in overrides:
        if key in schedule:
            schedule[key] = overrides[key]
    data["schedule"] = schedule
    _raise(source, check_ranges(data))
    resolved = [_resolve_params(i, raw, schedule, source) for i, raw in enumerate(data["rules"])]
    used = set(schedule)
    for index, params in enumerate(resolved):
        if params is None:
            continue
        for key, value in overrides.items():
            if key in params:
                params[key] = value
                used.add(key)
        data["rules"][index]["params"] = dict(params)
        problems = get_method(data["rules"][index]["method"]).check(params)
        if problems:
            raise RecipeError(f"{source}: " + "; ".join(
                f"$.rules[{index}].params.{k}: {msg}" + (" (from the call's overrides)" if k in overrides else "")
                for k, msg in problems))
    _raise(source, check_finite(data), " (with the call's overrides)")
    # read-only copies: an edit of them would not reach sparsify(), which builds from data
    rules = tuple(Rule(i, raw["match"], raw["method"], params or {}) for i, (raw, params)
                  in enumerate(zip(data["rules"], resolved)))
    unused = sorted(set(overrides) - used)
    if unused:
        known = sorted({k for r in rules if r.method for k in r.params} | set(schedule))
        close = [m for k in unused for m in difflib.get_close_matches(k, known + list(CALL_KEYWORDS), n=1)]
        raise RecipeError(f"override {', '.join(map(repr, unused))} is not a parameter of this recipe "
                          f"({source}){': did you mean ' + ', '.join(close) + '? Its' if close else '; its'} "
                          f"parameters: {', '.join(known)}")
    recipe = Recipe(name=data.get("name", Path(source).stem), description=data.get("description", ""),
                    source=source, data=data, rules=rules, overrides=given)
    check_time_values(recipe, get_method)  # a negative time is told here, not first by sparsify()
    return recipe
