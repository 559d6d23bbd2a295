"""Graphs that read ``self.training`` in Python control flow but compute the same in both modes.

A traced graph holds the branch its modules' ``training`` flags took at trace time; a call in the
other mode runs the module's own forward (:class:`passes.calls.CallGuard`), without the nodes a
rewrite inserted. Some branches only change the memory layout: diffusers' ``ResnetBlock2D`` does
``if self.training: x = x.contiguous()``, so every evaluation of a diffusers model ran without
them. :func:`same_in_both_modes` traces such a graph again with those flags flipped and compares
the two with value-preserving layout calls taken out; equal graphs serve both modes.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

__all__ = ["same_in_both_modes", "graph_key"]

#: calls that return their input's values unchanged (only the memory layout may differ)
_LAYOUT_ONLY = {"contiguous"}


def graph_key(graph: fx.Graph) -> list[str]:
    """One string per node (op, target and inputs by position), layout-only calls taken out.

    >>> import torch
    >>> class A(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.contiguous().relu()
    >>> class B(torch.nn.Module):
    ...     def forward(self, y):
    ...         return y.relu()
    >>> graph_key(fx.symbolic_trace(A()).graph) == graph_key(fx.symbolic_trace(B()).graph)
    True
    """
    alias: dict[fx.Node, fx.Node] = {}
    kept: list[fx.Node] = []
    for n in graph.nodes:
        if n.op == "call_method" and n.target in _LAYOUT_ONLY and isinstance(n.args[0], fx.Node):
            alias[n] = alias.get(n.args[0], n.args[0])
        else:
            kept.append(n)
    index = {n: i for i, n in enumerate(kept)}
    ref = lambda a: fx.node.map_arg(a, lambda x: f"%{index[alias.get(x, x)]}")  # noqa: E731
    return [f"{n.op}|{n.target if isinstance(n.target, str) else getattr(n.target, '__qualname__', n.target)}|"
            f"{ref(n.args)!r}|{ref(n.kwargs)!r}" if n.op != "placeholder" else f"placeholder|{index[n]}"
            for n in kept]


def same_in_both_modes(root: nn.Module, graph: fx.Graph, baked: dict, retrace: Callable[[], fx.Graph]) -> bool:
    """Does ``graph`` (traced from ``root`` with the mode flags ``baked``: ``{(path, flag): value}``)
    also compute what ``retrace()`` gives with each ``training`` flag among them flipped?"""
    modules = [(root.get_submodule(path) if path else root, value) for (path, flag), value in baked.items()
               if flag == "training"]
    try:
        for m, value in modules:
            m.training = not value  # this module only: its children keep theirs
        other = retrace()
    except Exception:
        return False
    finally:
        for m, value in modules:
            m.training = value
    return graph_key(other) == graph_key(graph)
