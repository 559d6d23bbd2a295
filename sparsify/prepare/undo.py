"""Putting a module tree back as it was when a rewrite fails halfway.

``sparsify(..., inplace=True)`` swaps the caller's own submodules. The recipe is validated before
anything is touched, but a method or a trace can still raise in the middle of the rewrite: then
:class:`TreeSnapshot` restores every module's attributes, children, parameters and buffers (the
tensor objects themselves, which the rewrite never replaces), so the caller can fix the call and
retry on the same model.
"""
from __future__ import annotations

from torch import nn

__all__ = ["TreeSnapshot", "mirror_children"]

# (the forward pre-hooks: sparsify.core.forwards.watch_forwards adds one to a kept plain layer)
_CONTAINERS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks")


class TreeSnapshot:
    """What :meth:`restore` needs to undo any change to the structure of ``root``'s modules.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> snap, old = TreeSnapshot(m), m[0]
    >>> m[0] = torch.nn.Identity(); m[1].inplace = True; m[1].__class__ = torch.nn.ReLU6
    >>> snap.restore()
    >>> m[0] is old, m[1].inplace, type(m[1]).__name__
    (True, False, 'ReLU')
    """

    def __init__(self, root: nn.Module):
        self._saved = []
        for m in root.modules():
            attrs = dict(m.__dict__)
            contents = {k: type(attrs[k])(attrs[k]) for k in _CONTAINERS if k in attrs}
            self._saved.append((m, type(m), attrs, contents))

    def restore(self) -> None:
        for m, cls, attrs, contents in self._saved:
            m.__class__ = cls  # torch's transformer layers are given a traceable class (prepare/open_transformer.py)
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for key, content in contents.items():
                # the rewrite mutated these containers in place: give them their old content back
                attrs[key].clear()
                attrs[key].update(content)


def mirror_children(model: nn.Module, root: nn.Module) -> None:
    """Give ``model`` the layers its traced ``root`` swapped at the top level. The GraphModule holds
    ``model``'s own submodules, so swaps below the top happened in ``model`` already; without this
    ``inplace=True`` left the caller's model half rewritten (``layer1[0].conv1`` sparse, ``conv1``
    not)."""
    for name, child in list(model.named_children()):
        new = root._modules.get(name)
        if isinstance(new, nn.Module) and new is not child:
            setattr(model, name, new)
