"""Which torch functions the code of some modules calls itself, on example inputs: not what the
modules they call do. ``sparsify``'s automatic capture asks it before trying ``torch.export`` on a
model ``torch.fx`` could only partly trace: the code of the modules that run their own forward
is the one thing ``torch.export`` could reach beyond ``torch.fx``, and when it calls no function a
rule inserts nodes after, the export (tens of seconds on a segmentation model) cannot reach more.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .reproduce import kept_state

__all__ = ["own_calls"]


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[int], watched: set[int], names: set[str]):
        super().__init__()
        self.stack, self.watched, self.names = stack, watched, names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode is off while a function runs: what F.relu calls in turn is not seen
        if self.stack and self.stack[-1] in self.watched:
            self.names.add(getattr(func, "__name__", str(func)).rstrip("_"))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def own_calls(root: nn.Module, names: list[str], args: tuple) -> set[str] | None:
    """Names (``relu`` for ``F.relu``, ``torch.relu``, ``x.relu_()``) of the torch functions and
    tensor methods that the forward code of the submodules ``names`` of ``root`` ("" is ``root``)
    calls directly, in one forward of ``root`` on ``args`` in its current mode; None when that
    forward raises. Buffers and random state are put back.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.lin = nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return torch.nn.functional.gelu(self.lin(x)).relu()
    >>> sorted(own_calls(Net(), [""], (torch.ones(1, 2),)))
    ['gelu', 'relu']
    """
    watched = {id(root.get_submodule(n)) for n in names}
    stack: list[int] = []
    hooks = []

    def leave(module, args, out):
        stack.pop()  # returns nothing: a forward hook's value would replace the output
    for m in root.modules():
        hooks.append(m.register_forward_pre_hook(lambda m, a: stack.append(id(m))))
        hooks.append(m.register_forward_hook(leave, always_call=True))
    found: set[str] = set()
    try:
        with kept_state(root), _Recorder(stack, watched, found):
            root(*args)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return found
