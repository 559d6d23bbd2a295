"""How ``sparsify.param_groups`` builds its optimizer groups: the groups methods ask for (STR's
decayed thresholds) first claim their parameters, the rest split into decayed and ``no_decay``
ones; and the checks of ``weight_decay`` and ``no_decay``.

Apart from :mod:`sparsify.api`, which keeps ``param_groups``' signature and docstring, because
optimizer groups are their own concern: nothing else in the API reads them.
"""
from __future__ import annotations

import math
import numbers

from torch import nn

from sparsify.core.schedules import plain_number
from sparsify.core.state import find_state, unwrap

__all__ = ["build_param_groups"]


def build_param_groups(model: nn.Module, weight_decay, no_decay, options: dict) -> list[dict]:
    """:func:`sparsify.param_groups`' groups, its arguments checked (``options``: its keyword options)."""
    if "params" in options:  # spread into every group, it replaced the group's parameters: an optimizer training nothing
        raise TypeError("sparsify.param_groups: params= is no option (it fills each group's params from the model; "
                        "to leave parameters out of training, set requires_grad=False on them)")
    state = find_state(model, where="sparsify.param_groups")
    weight_decay, no_decay = _decay_arguments(weight_decay, no_decay)
    root = unwrap(model)
    claimed = {}
    groups = []
    for g in state.groups.values():
        for params, opts in g.param_options(weight_decay):
            params = [p for p in params if id(p) not in claimed]
            for p in params:
                claimed[id(p)] = True
            if params:
                groups.append({"params": params, **options, **opts})
    decay, plain = [], []
    for name, p in root.named_parameters():
        if id(p) in claimed:
            continue
        (plain if no_decay and name.endswith(tuple(no_decay)) else decay).append(p)
    base = []
    if decay:  # no key for None: a group's value would override the optimizer's (it silently dropped it)
        base.append({"params": decay, **({} if weight_decay is None else {"weight_decay": weight_decay}), **options})
    if plain:
        base.append({"params": plain, "weight_decay": 0.0, **options})
    return base + groups


def _decay_arguments(weight_decay, no_decay) -> tuple[float, tuple[str, ...]]:
    """``param_groups``' ``weight_decay`` as a float (or None) and ``no_decay`` as a tuple of suffixes."""
    weight_decay = plain_number(weight_decay)
    if weight_decay is not None and (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)):
        raise TypeError(f"sparsify.param_groups: weight_decay must be a number >= 0 or None, got "
                        f"{type(weight_decay).__name__}")
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"sparsify.param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    # a bare string would be split into its letters by tuple(), each letter a suffix
    suffixes = (no_decay,) if isinstance(no_decay, str) else no_decay
    try:
        suffixes = tuple(suffixes)
    except TypeError:
        suffixes = None
    if suffixes is None or not all(isinstance(x, str) for x in suffixes):
        bad = type(no_decay).__name__ if suffixes is None else \
            f"{type(no_decay).__name__} holding {type(next(x for x in suffixes if not isinstance(x, str))).__name__}"
        raise TypeError(f"sparsify.param_groups: no_decay must be a name suffix or a tuple of them "
                        f"(\"bias\" or (\"bias\", \"bn\")), got {bad}")
    return (None if weight_decay is None else float(weight_decay)), suffixes
