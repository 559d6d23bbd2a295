"""Sparsified models that train the same parameter tensors.

``sparsify`` shares the caller's parameter tensors with the model it returns (no copy of the
weights, as ``torch.fx.symbolic_trace`` does), so training one trains the other. A sweep that
calls ``sparsify(base, recipe)`` for one recipe after another without ``copy=True`` therefore
starts each run from the weights the previous one left (pruned ones included): a ``sparsify`` of
tensors that an earlier sparsified model has trained (taken a ``sparsify.step`` with) warns.
"""
from __future__ import annotations

import weakref

from torch import nn

__all__ = ["trained_through_earlier", "remember_holder", "mark_trained", "SHARED_WARNING"]

SHARED_WARNING = ("sparsify: this model's weights were trained through a model sparsify() returned earlier: "
                  "sparsify copies no weights, so they are the same tensors, and this run starts where that one "
                  "left them, pruned weights included. For independent runs (a sweep over recipes) pass copy=True "
                  "to every sparsify() of the model, or build the model anew for each run")

# id(parameter) -> [the parameter (weakly), whether a model sparsify() returned has taken a step with it]
_HOLDERS: dict[int, list] = {}


def _trained(p: nn.Parameter) -> bool:
    entry = _HOLDERS.get(id(p))
    return entry is not None and entry[0]() is p and entry[1]


def trained_through_earlier(model: nn.Module) -> bool:
    """Whether one of ``model``'s parameter tensors is held by a model ``sparsify`` returned before
    that has taken a ``sparsify.step`` (trained it) since.

    >>> import torch, sparsify
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> first = sparsify.sparsify(base, "gmp", total_steps=10)
    >>> trained_through_earlier(base)
    False
    >>> _ = sparsify.step(first)
    >>> trained_through_earlier(base)
    True
    """
    return any(_trained(p) for p in model.parameters())


def remember_holder(root: nn.Module) -> None:
    """Note the parameter tensors of ``root`` (returned by ``sparsify``), not trained yet."""
    for key in [k for k, (p, _) in _HOLDERS.items() if p() is None]:
        del _HOLDERS[key]
    for p in root.parameters():
        if not _trained(p):
            _HOLDERS[id(p)] = [weakref.ref(p), False]


def mark_trained(root: nn.Module) -> None:
    """Note that ``root`` takes optimizer steps (``sparsify.step``) with its parameter tensors."""
    for p in root.parameters():
        entry = _HOLDERS.get(id(p))
        if entry is not None and entry[0]() is p:
            entry[1] = True
