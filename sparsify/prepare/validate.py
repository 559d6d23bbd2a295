"""Validating a recipe as a whole, before any module is created or swapped.

:func:`sparsify.prepare.recipe.load_recipe` runs the document checks (duplicate keys, finite
numbers, the JSON Schema, each method's typed params); :func:`check_times` runs the checks that
need ``total_steps`` (every time resolved to a step and ordered as the method's
``Params.time_order`` says, ``begin <= end <= fix`` by default; stages in order; every
``params.stage`` naming a stage). ``build`` calls it first, so a recipe that would fail
halfway through a rewrite fails before the model is touched. Every message names the JSON path
of the offending field.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterator

from sparsify.core.errors import RecipeError
from sparsify.core.schedules import ScheduleError, plain_number, resolve_time

__all__ = ["RecipeError", "json_path", "loads_strict", "check_duplicates", "check_finite", "check_ranges",
           "check_total_steps", "check_time_values", "check_times", "schedule_warnings"]


def json_path(parts) -> str:
    """``$.rules[0].params.lam`` from ``["rules", 0, "params", "lam"]``.

    >>> json_path(["rules", 0, "params", "lam"])
    '$.rules[0].params.lam'
    """
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


class _Pairs(dict):
    """A JSON object that remembers the keys it was given more than once."""

    duplicates: tuple = ()


def _pairs(pairs) -> dict:
    out = _Pairs()
    seen = set()
    dups = []
    for key, value in pairs:
        if key in seen and key not in dups:
            dups.append(key)
        seen.add(key)
        out[key] = value  # the last value wins, as in json.loads; reported below anyway
    out.duplicates = tuple(dups)
    return out


def loads_strict(text: str):
    """``json.loads`` whose objects remember duplicated keys (see :func:`check_duplicates`).

    >>> check_duplicates(loads_strict('{"a": {"b": 1, "b": 2}}'))
    [(['a', 'b'], "duplicate key 'b' (a JSON object holds each key once; the last value would win silently)")]
    """
    return json.loads(text, object_pairs_hook=_pairs)


def _walk(value, path: list) -> Iterator[tuple[list, Any]]:
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, path + [k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, path + [i])


def check_duplicates(data) -> list[tuple[list, str]]:
    """``(path, message)`` for every key given twice in one object of a :func:`loads_strict` document."""
    out = []
    for path, value in _walk(data, []):
        for key in getattr(value, "duplicates", ()):
            out.append((path + [key], f"duplicate key {key!r} (a JSON object holds each key once; "
                                      "the last value would win silently)"))
    return out


def check_finite(data) -> list[tuple[list, str]]:
    """``(path, message)`` for every NaN or infinite number (JSON's ``NaN`` / ``Infinity``).

    >>> check_finite({"rules": [{"params": {"lam": float("nan")}}]})
    [(['rules', 0, 'params', 'lam'], 'must be a finite number, got nan')]
    """
    return [(path, f"must be a finite number, got {value!r}") for path, value in _walk(data, [])
            if isinstance(value, float) and not math.isfinite(value)]


def check_ranges(data) -> list[tuple[list, str]]:
    """``(path, message)`` for every ``match.in_channels`` / ``match.out_channels`` whose ``min``
    is above its ``max``: a range no layer is in (the rule would only "match nothing").

    >>> check_ranges({"rules": [{"match": {"in_channels": {"min": 10, "max": 3}}}]})
    [(['rules', 0, 'match', 'in_channels'], 'empty range: min 10 is above max 3 (both bounds are inclusive)')]
    """
    out = []
    rules = data.get("rules") if isinstance(data, dict) else None
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        match = rule.get("match") if isinstance(rule, dict) else None
        for key in ("in_channels", "out_channels"):
            bounds = match.get(key) if isinstance(match, dict) else None
            lo, hi = (bounds.get("min"), bounds.get("max")) if isinstance(bounds, dict) else (None, None)
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) and lo > hi:
                out.append((["rules", i, "match", key], f"empty range: min {lo} is above max {hi} (both bounds "
                                                        "are inclusive)"))
    return out


def check_total_steps(total_steps) -> int | None:
    """``total_steps`` as a Python int: None or a positive whole number of optimizer steps (numpy
    and 0-dim torch integers too), below 2**62 as every recipe time is.

    >>> import numpy as np
    >>> check_total_steps(np.int64(10))
    10
    >>> check_total_steps(2.5)
    Traceback (most recent call last):
    ...
    ValueError: total_steps must be a positive number of optimizer steps (an integer below 2**62), got 2.5
    """
    if total_steps is None:
        return None
    value = plain_number(total_steps)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2 ** 62:
        shown = f"an integer of {value.bit_length()} bits" if isinstance(value, int) and value >= 2 ** 62 \
            else repr(total_steps)
        raise ValueError(f"total_steps must be a positive number of optimizer steps (an integer below 2**62), "
                         f"got {shown}")
    return value


def _time(value, total_steps, what: str, require: bool, source: str):
    """The step of a recipe time; None when it is None, or a fraction nobody can resolve yet (a
    dry run without total_steps). Its error starts with the recipe's ``source``, as every recipe
    error does."""
    if not require and total_steps is None and isinstance(value, float) and 0 < value < 1:
        return None
    try:
        return resolve_time(value, total_steps, what=what)
    except ScheduleError as e:
        raise ScheduleError(f"{source}: {e}") from None


def _comparable(raw_a, step_a, raw_b, step_b):
    """The two times in one unit, or None when they cannot be ordered yet: resolved steps, or two
    fractions of a run whose length is still unknown (their order does not depend on it)."""
    if step_a is not None and step_b is not None:
        return step_a, step_b
    if all(isinstance(v, float) and 0 < v < 1 for v in (raw_a, raw_b)):
        return raw_a, raw_b
    return None


def _stage_ranges(stages: list[dict], total_steps, require: bool, source: str) -> dict[str, tuple]:
    ranges: dict[str, tuple] = {}
    previous = previous_fraction = None
    for i, st in enumerate(stages):
        path = f"$.stages[{i}]"
        if st["name"] in ranges:
            raise RecipeError(f"{source}: {path}.name: stage {st['name']!r} is defined twice")
        begin = _time(st["begin"], total_steps, f"{path}.begin", require, source)
        end = _time(st.get("end"), total_steps, f"{path}.end", require, source)
        pair = _comparable(st["begin"], begin, st.get("end"), end)
        if pair is not None and pair[1] < pair[0]:
            raise RecipeError(f"{source}: {path}.end: end ({pair[1]}) is before begin ({pair[0]})")
        # resolved steps, or two fractions (they order the same whatever the run's length)
        fraction = st["begin"] if isinstance(st["begin"], float) and 0 < st["begin"] < 1 else None
        for now, before in ((begin, previous), (fraction if begin is None else None, previous_fraction)):
            if now is not None and before is not None and now < before:
                raise RecipeError(f"{source}: {path}.begin: stages are listed in the order they start; "
                                  f"this one begins ({now}) before the one above it ({before})")
        previous = begin if begin is not None else previous
        previous_fraction = fraction if fraction is not None else previous_fraction
        ranges[st["name"]] = (begin, end)
    return ranges


def check_time_values(recipe, get_method) -> None:
    """Each time of ``recipe`` alone, before the run's length is known: a negative time, ``1.0``, a
    non-whole step count, and stages listed out of order are refused by :func:`load_recipe`, not
    first by ``sparsify()``; the order of a rule's times waits for :func:`check_times`, whose
    messages give the steps.

    >>> from sparsify.prepare.recipe import load_recipe
    >>> from sparsify.methods import get_method
    >>> check_time_values(load_recipe("st3", fix=None), get_method)
    >>> load_recipe("st3", begin=-1)
    Traceback (most recent call last):
    ...
    sparsify.core.schedules.ScheduleError: built-in:st3: $.rules[0].params.begin must be a step count >= 0 or a fraction in (0, 1), got -1
    """
    for rule in recipe.rules:
        if rule.method is None:
            continue
        for key in get_method(rule.method).schedule_keys:
            if key in rule.params:
                _time(rule.params[key], None, f"{rule.path}.params.{key}", False, recipe.source)
    _stage_ranges(recipe.stages, None, False, recipe.source)  # stages out of order, or defined twice


def check_times(recipe, get_method, total_steps: int | None, *, require: bool = True) -> None:
    """Resolve every time of ``recipe`` against ``total_steps`` and check their order.

    ``get_method(name)`` gives a method, whose ``schedule_keys`` are its time params and whose
    ``Params.time_order`` the pairs that must not decrease. ``require=False`` (dry runs) skips
    fractions when ``total_steps`` is unknown instead of failing.

    >>> from sparsify.prepare.recipe import load_recipe
    >>> from sparsify.methods import get_method
    >>> check_times(load_recipe("st3", begin=10, end=5, fix=None), get_method, None)
    Traceback (most recent call last):
    ...
    sparsify.core.errors.RecipeError: built-in:st3: $.rules[0].params.end: end (5) is before begin (10) (begin and end from the call's overrides)
    """
    total_steps = check_total_steps(total_steps)
    source = recipe.source
    stages = _stage_ranges(recipe.stages, total_steps, require, source)
    for rule in recipe.rules:
        if rule.method is None:
            continue
        p = rule.params
        at = f"{rule.path}.params"
        stage = p.get("stage")
        if stage is not None:
            if stage not in stages:
                known = ("the recipe's stages: " + ", ".join(map(repr, stages)) if stages else
                         "the recipe's stages block is empty" if "stages" in recipe.data else
                         "the recipe's stages: none (the recipe has no stages block)")
                raise RecipeError(f"{source}: {at}.stage: unknown stage {stage!r}; {known}")
            continue  # the stage's range replaces the rule's own begin / end
        method = get_method(rule.method)
        steps = {key: _time(p.get(key), total_steps, f"{at}.{key}", require, source)
                 for key in method.schedule_keys if key in p}
        for a, b in method.Params.time_order:
            if a not in steps or b not in steps:
                continue
            pair = _comparable(p.get(a), steps[a], p.get(b), steps[b])
            if pair is not None and pair[1] < pair[0]:
                given = [k for k in (a, b) if k in getattr(recipe, "overrides", ())]
                raise RecipeError(f"{source}: {at}.{b}: {b} ({_when(p.get(b), pair[1])}) is before {a} "
                                  f"({_when(p.get(a), pair[0])})"
                                  + (f" ({' and '.join(given)} from the call's overrides)" if given else ""))


def _when(raw, step) -> str:
    """A time as the error shows it: a fraction with the step it resolved to (``0.5 = step 12``)."""
    return f"{raw} = step {step}" if isinstance(raw, float) and raw != step else f"{step}"



def schedule_warnings(recipe, get_method, total_steps: int | None) -> list[str]:
    """What a valid recipe's times mean for a run of ``total_steps`` that its author may not
    expect: a method that never acts (``begin`` at or past the end, or an empty active range), a
    stage the run's length rounds to no step, a ramp that ends after the run (the target is never
    reached), masks that never freeze (``fix`` after the run), any other time of a method after the
    run. Times already pass
    :func:`check_times`.

    >>> from sparsify.prepare.recipe import load_recipe
    >>> from sparsify.methods import get_method
    >>> print(schedule_warnings(load_recipe("st3", begin=10, end=100, fix=None), get_method, 40)[0][:87])
    sparsify: rule 0 (st3) of recipe 'st3': end is step 100, after the run's total_steps=40
    """
    if total_steps is None:
        return []
    stages = _stage_ranges(recipe.stages, total_steps, True, recipe.source)
    out, empty = [], set()
    for name, (begin, end) in stages.items():  # a stage a short run rounds away (dual's weights stage at 2 steps)
        joined = [f"{r.index} ({r.method})" for r in recipe.rules
                  if r.method is not None and r.params.get("stage") == name]
        if joined and end is not None and end <= begin < total_steps:
            empty.add(name)
            rules, gets, does = ("rules", "get", "they do") if len(joined) > 1 else ("rule", "gets", "it does")
            out.append(f"sparsify: stage {name!r} of recipe {recipe.name!r} is empty in a run of "
                       f"total_steps={total_steps} (it begins and ends at step {begin}): {rules} {', '.join(joined)} "
                       f"{gets} no step inside it, so what {does} during the stage (a penalty, a ramp) is skipped; "
                       "the run is too short for the recipe's stages")
    for rule in recipe.rules:
        if rule.method is None or rule.params.get("stage") in empty:
            continue
        method, p = get_method(rule.method), rule.params
        head = f"sparsify: rule {rule.index} ({rule.method}) of recipe {recipe.name!r}: "
        ramp, window = method.Params.ramp_end, method.Params.window_only
        if p.get("stage") is not None:
            begin, end = stages[p["stage"]]
            where = f"stage {p['stage']!r} "
        else:
            begin, end, where = None, None, ""
            if "begin" in method.schedule_keys:
                begin = resolve_time(p.get("begin", 0), total_steps, what="begin")
            if "end" in method.schedule_keys and p.get("end") is not None:
                end = resolve_time(p["end"], total_steps, what="end")
        fix = p.get("fix") if "fix" in method.schedule_keys else None
        fix = resolve_time(fix, total_steps, what="fix") if fix is not None else None
        if begin is not None and begin == total_steps and not window:  # its update at the last sparsify.step
            out.append(f"{head}{where}begin is step {begin}, the run's last step (total_steps={total_steps}): the "
                       "method acts only after the last optimizer step, so the model is made sparse with no "
                       "training at its sparsity (a one-shot prune); give times as fractions of the run (0.1) or "
                       "check total_steps")
            continue
        if begin is not None and begin >= total_steps:
            out.append(f"{head}{where}begin is step {begin}, at or after the run's total_steps={total_steps}: "
                       "the method never acts in this run; give times as fractions of the run (0.1) or check "
                       "total_steps")
            continue
        if window and end is not None and begin is not None and end <= begin:
            out.append(f"{head}{where}begin and end are both step {begin}: the method's active range is empty "
                       "and it never acts")
            continue
        if ramp and not p.get("stage") and end is not None and end > total_steps:
            out.append(f"{head}end is step {end}, after the run's total_steps={total_steps}: the ramp never "
                       "reaches the target sparsity; end it within the run (a fraction: 0.5)")
        if fix is not None and fix > total_steps:
            out.append(f"{head}fix is step {fix}, after the run's total_steps={total_steps}: the masks never "
                       "freeze and the run has no fine-tuning phase")
        for key in method.schedule_keys:  # the method's other times (a user method's `at`, `start`)
            if key in ("begin", "end", "fix") or p.get(key) is None:
                continue
            if (step := resolve_time(p[key], total_steps, what=key)) > total_steps:
                out.append(f"{head}{key} is step {step}, after the run's total_steps={total_steps}: the run never "
                           "reaches it; give it as a fraction of the run (0.5) or check total_steps")
    return out
