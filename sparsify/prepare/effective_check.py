"""The check that a method written outside the library computes a weight its layer can use.

A layer built on :class:`~sparsify.core.layers.SparseWeightMixin` computes with what its
``effective_weight()`` returns; one of another shape, dtype or device fails in the first forward
with torch's own error (``mat1 and mat2 shapes cannot be multiplied``), far from the method that
caused it. ``sparsify()`` calls ``effective_weight()`` once on each such member of a method
defined outside the library and names the layer and the method when the result does not fit.
The built-in methods (``sparsify.methods.BUILT_IN``) are tested for this and skip the call: it
would cost a tenth of ``sparsify()``'s time on a ResNet-50 for GMP and N:M.
"""
from __future__ import annotations

import torch

from sparsify.methods import BUILT_IN, SparseWeightMixin, get_method

__all__ = ["check_effective_weights"]


def _own_method(group) -> bool:
    return type(get_method(group.method_name)) not in BUILT_IN


def _mismatch(w, ref: torch.Tensor) -> str | None:
    if not isinstance(w, torch.Tensor):
        return f"a {type(w).__name__}, not a tensor"
    for what in ("shape", "dtype", "device"):
        got, want = getattr(w, what), getattr(ref, what)
        if got != want:
            show = (lambda s: tuple(s)) if what == "shape" else str
            return f"{what} {show(got)} for a weight of {what} {show(want)}"
    return None


def check_effective_weights(groups) -> None:
    """Raise a one-line ``ValueError`` when a member of a method defined outside the library
    computes an effective weight that its layer cannot multiply with.

    >>> from torch import nn
    >>> from sparsify.core.contract import Group, Method
    >>> from sparsify.core.registry import REGISTRY, register
    >>> @register
    ... class Mine(Method):
    ...     name = "mine"
    >>> class Transposed(SparseWeightMixin, nn.Linear):
    ...     def effective_weight(self):
    ...         return self.weight.t()
    >>> group = Group(get_method("mine"), {}, {"fc": Transposed(4, 2)}, None)
    >>> check_effective_weights([group])
    Traceback (most recent call last):
    ...
    ValueError: sparsify: Transposed.effective_weight() of fc (method 'mine') returned shape (4, 2) for a weight of shape (2, 4); it must return a tensor of the weight's shape, dtype and device (docs/writing-a-method.md)
    >>> del REGISTRY["mine"]
    """
    for group in groups:
        if not _own_method(group):
            continue
        for name, m in group.members.items():
            if not isinstance(m, SparseWeightMixin) or m.weight.is_meta:
                continue
            with torch.no_grad():
                why = _mismatch(m.effective_weight(), m.weight)
            if why:
                raise ValueError(f"sparsify: {type(m).__name__}.effective_weight() of {name} (method "
                                 f"{group.method_name!r}) returned {why}; it must return a tensor of the "
                                 f"weight's shape, dtype and device (docs/writing-a-method.md)")
