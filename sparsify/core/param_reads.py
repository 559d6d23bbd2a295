"""Parameters that a model's own code hands to ops, outside a call of the module that holds them.

A layer that is called (``self.fc(x)``) computes with its weight inside its own call. Code that
instead hands the weight to an op itself (``x @ self.fc.weight.t()``, Mamba's
``self.dt_proj.weight @ x``, ``F.linear(h, self.proj.weight)``) reads it directly: a rewritten
layer's swap does not reach such a read. Two places need to find such reads in one forward:
preparation, which leaves those layers dense (sparsify/prepare/direct_reads.py), and finalize's
divergence search, which names such a read as the cause of a difference
(sparsify/deploy/divergence.py). :class:`ParamReads` is the one watcher both use.

A read counts when an op gets the parameter (itself, or inside a list or tuple argument) and
returns a tensor (``weight.dtype`` or ``weight.shape`` read no values), while no module holding
the parameter runs its own call (a tied weight has several holders), and the innermost call under
way is not a graph: a graph's ``get_attr`` reads are rewired by sparsify/prepare/hidden.py.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from passes.hooks import is_inlined

__all__ = ["ParamReads"]


class ParamReads(torch.overrides.TorchFunctionMode):
    """While active (a context manager), calls ``on_read(param, func)`` for every direct read
    of a parameter of ``root`` (those in ``watched`` only, when given). Forward hooks on the
    modules of ``root`` follow the calls under way; :meth:`remove` takes them off.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(2, 2)
    ...     def forward(self, x):  # called, and its weight read again outside the call
    ...         return self.fc(x) @ self.fc.weight
    >>> net, seen = Net(), []
    >>> reads = ParamReads(net, lambda p, func: seen.append(func.__name__))
    >>> with reads:
    ...     _ = net(torch.ones(1, 2))
    >>> reads.remove(); seen
    ['matmul']
    """

    def __init__(self, root: nn.Module, on_read: Callable[[torch.Tensor, object], None],
                 watched: list[torch.Tensor] | None = None):
        super().__init__()
        self.on_read = on_read
        keep = None if watched is None else {id(p) for p in watched}
        self.owners: dict[int, set[int]] = {}  # parameter -> the modules holding it
        for m in root.modules():
            for p in m._parameters.values():
                if p is not None and (keep is None or id(p) in keep):
                    self.owners.setdefault(id(p), set()).add(id(m))
        self.running: dict[int, int] = {}  # module -> calls of it under way (a module may call itself)
        self.stack: list[nn.Module] = []
        self.handles = [h for m in root.modules() if not is_inlined(m)  # a graph runs its code: never called
                        for h in (m.register_forward_pre_hook(self._enter),
                                  m.register_forward_hook(self._leave, always_call=True))]

    def _enter(self, module, args):
        self.running[id(module)] = self.running.get(id(module), 0) + 1
        self.stack.append(module)

    def _leave(self, module, args, out):
        self.running[id(module)] -= 1
        self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.stack or isinstance(self.stack[-1], fx.GraphModule):
            return out  # outside the model, or a graph's get_attr read (rewired)
        computed = None
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                owners = self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None
                if owners is None or any(self.running.get(o) for o in owners):
                    continue
                if computed is None:
                    computed = any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(out))
                if computed:
                    self.on_read(t, func)
        return out

    def remove(self) -> None:
        """Take the forward hooks off ``root``'s modules."""
        for h in self.handles:
            h.remove()
