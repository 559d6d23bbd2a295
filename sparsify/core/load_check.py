"""How a checkpoint's run differs from the model's: what ``load_state_dict`` names when it refuses a
checkpoint of another ``sparsify(...)`` call (``sparsify.core.load_hooks.before_load``, the model's
pre-hook, which also drops the penalty terms recorded since the last collection).

A sparsified model's ``state_dict`` holds the recipe and ``total_steps`` it was made with (the
extra state of its :class:`~sparsify.core.state.SparsifyState`). That state is the model's last
child, so a check in its ``set_extra_state`` runs after every layer took the checkpoint's weights,
masks, thresholds and step: a caller who catches the error ("resume if possible, else start
fresh") trained a model already at the checkpoint's step with another recipe's masks.
``before_load``, a ``load_state_dict`` pre-hook of the model itself, compares first and names what
differs (:func:`run_difference`).

Penalty terms recorded by a forward whose loss never collected them (a training-mode forward for
a metric) belong to the autograd graph of the weights as they were: after a rollback to an
earlier checkpoint, the next ``sparsify.penalty`` added them to the loss and ``backward`` failed
inside autograd ("modified by an inplace operation"). The load drops them.

Modules a recipe inserts inside a nested ``nn.Sequential`` were once kept in it
(``features.0_pmask``); they now sit beside it (``features_0_pmask``), and a checkpoint of such a
run is loaded under the new names (:func:`moved_keys`).

A checkpoint saved from the model inside a wrapper (DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``) holds the state under other names, and a load takes none of it: the missing key's
note names the prefix instead of calling it a dense checkpoint (:func:`prefixed_line`).
"""
from __future__ import annotations

import json

from sparsify.core.extra_state import unpack

__all__ = ["run_difference", "what_runs", "moved_keys", "prefixed_line"]


def _differences(a, b, path: str = "") -> list[str]:
    """Paths where two JSON values differ, each with both values.

    >>> _differences({"rules": [{"params": {"sparsity": 0.9}}]}, {"rules": [{"params": {"sparsity": 0.5}}]})
    ['rules[0].params.sparsity: 0.9 in the checkpoint, 0.5 here']
    """
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(f"{sub}: {'absent' if k not in a else json.dumps(a[k])} in the checkpoint, "
                           f"{'absent' if k not in b else json.dumps(b[k])} here")
            else:
                out.extend(_differences(a[k], b[k], sub))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or 'recipe'}: {json.dumps(a)} in the checkpoint, {json.dumps(b)} here"]


def what_runs(recipe: dict) -> dict:
    """``recipe`` without the fields that are only shown (its name, a file's stem when it has none;
    its description; a rule's comment; a stage's description): a checkpoint whose recipe differs
    only in them is of the same run.

    >>> what_runs({"name": "a", "description": "d", "rules": [{"method": "st3", "comment": "v1"}]})
    {'rules': [{'method': 'st3'}]}
    """
    def without(items, key):
        return [{k: v for k, v in x.items() if k != key} if isinstance(x, dict) else x for x in items] \
            if isinstance(items, list) else items
    out = {k: v for k, v in recipe.items() if k not in ("name", "description")}
    for block, key in (("rules", "comment"), ("stages", "description")):
        if block in out:
            out[block] = without(out[block], key)
    return out


def run_difference(saved, recipe_json: str, total_steps: int | None) -> str | None:
    """What differs between the run a checkpoint's packed state ``saved`` describes and the model's
    (its recipe as JSON text, its ``total_steps``); None when nothing does. Fields that are only
    shown (name, description, comments: :func:`what_runs`) do not count. Recipes of two names
    are named; for one name, the first values that differ.

    >>> from sparsify.core.extra_state import pack
    >>> saved = pack({"recipe": '{"name": "st3", "rules": [{"method": "st3"}]}', "total_steps": 10})
    >>> run_difference(saved, '{"name": "st3", "rules": [{"method": "st3"}]}', 20)
    'total_steps: 10 in the checkpoint, 20 here'
    >>> run_difference(saved, '{"name": "gmp", "rules": [{"method": "gmp"}]}', 10)
    'recipe "st3" in the checkpoint, "gmp" here'
    >>> run_difference(saved, '{"name": "st3", "rules": [{"method": "st3", "params": {"sparsity": 0.5}}]}', 10)
    'rules[0].params: absent in the checkpoint, {"sparsity": 0.5} here'
    >>> run_difference(saved, '{"name": "mine", "rules": [{"method": "st3", "comment": "v2"}]}', 10) is None
    True
    """
    state = unpack(saved)
    if state["recipe"] == recipe_json and state["total_steps"] == total_steps:
        return None
    found = []
    if state["total_steps"] != total_steps:
        found.append(f"total_steps: {state['total_steps']} in the checkpoint, {total_steps} here")
    try:
        a, b = json.loads(state["recipe"]), json.loads(recipe_json)
    except (TypeError, ValueError):
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        runs_a, runs_b = what_runs(a), what_runs(b)
        # compared as JSON text too: 1 and 1.0, or true and 1, are equal in Python but not to a method
        if json.dumps(runs_a, sort_keys=True) == json.dumps(runs_b, sort_keys=True):
            if not found:
                return None
        elif a.get("name") != b.get("name"):
            found.append(f"recipe {json.dumps(a.get('name'))} in the checkpoint, {json.dumps(b.get('name'))} here")
        else:
            found.extend(_differences(runs_a, runs_b) or ["the recipe"])
    elif state["recipe"] != recipe_json:
        found.append("the recipe")
    shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return shown or "the recipe"


def moved_keys(saved: list[str], own: list[str]) -> dict[str, str]:
    """``{checkpoint key: model key}`` for the inserted modules' entries that a checkpoint holds
    under their former names, inside a nested ``nn.Sequential`` (``own``: the keys of those
    modules in the model). Names are compared with every ``_`` read as ``.``; a key that
    could be more than one is left alone (``load_state_dict`` names it).

    >>> moved_keys(["features.0_pmask.mask", "features.0.weight"], ["features_0_pmask.mask"])
    {'features.0_pmask.mask': 'features_0_pmask.mask'}
    """
    saved_set, candidates = set(saved), {}
    for key in own:
        if key not in saved_set:
            candidates.setdefault(key.replace("_", "."), []).append(key)
    own_set, out = set(own), {}
    for key in saved:
        found = candidates.get(key.replace("_", "."), [])
        if key not in own_set and len(found) == 1:
            out[key] = found[0]
    return out


def prefixed_line(key: str, saved: list[str]) -> str | None:
    """What to do when the checkpoint holds this model's sparsify state (missing as ``key``) under
    other key names, ``saved`` (the checkpoint's sparsify-state keys it did not load:
    ``sparsify.core.state.saved_states``): a DDP-wrapped model's ``module.``, ``torch.compile``'s
    ``_orig_mod.``, or a wrapper the model lacks; None when none of them is.

    >>> prefixed_line("sparsify_state._extra_state", ["module.sparsify_state._extra_state"]).split(" (")[0]
    "the checkpoint's keys start with 'module.'"
    """
    for u in saved:
        if u.endswith("." + key):
            extra = u[:-len(key)]
            return (f"the checkpoint's keys start with {extra!r} (saved from a wrapper: DDP's module, "
                    f"torch.compile's _orig_mod, ...) and nothing of it was loaded: strip it first, "
                    f"{{k.removeprefix({extra!r}): v for k, v in checkpoint.items()}}, or load it into the same wrapper")
        if key.endswith("." + u):
            missing_prefix = key[:-len(u)]
            return (f"the checkpoint's keys lack the prefix {missing_prefix!r} this model's have (saved from the "
                    "model inside a wrapper) and nothing of it was loaded: load it into that inner model, or add "
                    f"the prefix, {{{missing_prefix!r} + k: v for k, v in checkpoint.items()}}")
    return None
