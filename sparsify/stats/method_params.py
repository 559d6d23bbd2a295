"""The parameters a method trains for itself besides the model's weights (STR's thresholds): the
model ``finalize`` ships leaves them out, and ``sparsify.report``'s "whole model" count says so
(``totals["method_params"]``)."""
from __future__ import annotations

from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import SparsifyState

__all__ = ["method_parameters", "left_out"]


def method_parameters(state: SparsifyState) -> dict[str, dict[int, int]]:
    """``{method: {id(parameter): numel}}``: the parameters each method trains besides the model's
    weights (STR's per-layer thresholds on its layers, str-global's one in its group), which
    ``finalize`` does not ship; a parameter shared by several is counted once."""
    own: dict[str, dict[int, int]] = {}
    for group in state.groups.values():
        found = own.setdefault(group.method_name, {})
        found.update((id(p), p.numel()) for p in group.parameters())
        found.update((id(p), p.numel()) for m in group.members.values() if isinstance(m, SparseWeightMixin)
                     for n, p in m.named_parameters(recurse=False) if n not in ("weight", "bias"))
    seen = {i for ps in own.values() for i in ps}
    # any the state holds outside its groups
    if extra := {id(p): p.numel() for p in state.parameters() if id(p) not in seen}:
        own["sparsify"] = extra
    return own


def left_out(method_params: dict | None) -> str:
    """What the "whole model" count leaves out, said after it (nothing when the methods train no
    parameter of their own).

    >>> left_out({"str": 4})
    ', as finalize ships it (without the 4 parameters str trains besides the weights)'
    >>> left_out({"str": 4, "mine": 1})
    ', as finalize ships it (without the parameters the methods train besides the weights: str 4, mine 1)'
    >>> left_out({})
    ''
    """
    if not method_params:
        return ""
    if len(method_params) == 1:
        (name, n), = method_params.items()
        return f", as finalize ships it (without the {n:,} parameter{'s' * (n > 1)} {name} trains besides the weights)"
    said = ", ".join(f"{name} {n:,}" for name, n in method_params.items())
    return f", as finalize ships it (without the parameters the methods train besides the weights: {said})"
