"""Graphs that read ``self.training`` in Python control flow but compute the same in both modes.

A traced graph holds the branch its modules' ``training`` flags took at trace time; a call in the
other mode runs the module's own forward (:class:`passes.calls.CallGuard`), without the nodes a
rewrite inserted. Some branches only change the memory layout: diffusers' ``ResnetBlock2D`` does
``if self.training: x = x.contiguous()``, so every evaluation of a diffusers model ran without
them. :func:`same_in_both_modes` traces such a graph again with those flags flipped and compares
the two with value-preserving layout calls taken out; equal graphs serve both modes. Modules whose
branch does change values and that only wrap an activation run as they are (:func:`mode_split`).
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

__all__ = ["same_in_both_modes", "graph_key", "mode_split", "MODE_SPLIT", "MODE_KEPT"]

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


#: the reason recorded for a module :func:`mode_split` makes run its own forward
MODE_SPLIT = ("its forward branches on self.training, so a traced graph would hold one mode's branch and the "
              "other mode would run without the inserted nodes: it runs as it is in both modes, its activations "
              "reached through graphs of their own")
#: the same when no activation gets a graph of its own (a rewrite that reads across it, as SAS does)
MODE_KEPT = ("its forward branches on self.training, so a traced graph would hold one mode's branch and the "
             "other mode would run without the rewrites across its activation: it runs as it is in both modes")


def mode_split(root: nn.Module, baked: dict, prefix: str, forced: set[str], is_site: Callable,
               wraps: Callable | None) -> list[str]:
    """Local paths of the modules a graph of ``root`` inlined whose ``training`` flag the trace
    baked (``baked``: the tracer's ``{(path, flag): value}``) and that are better run as they are:
    each calls an activation ``wraps`` names (one that may get nodes inserted after it, or one a
    rewrite would read across, as SAS reads a relu's input) and holds no other module ``is_site``
    rewrites. timm's ``BatchNormAct2d`` (batch norm's training
    branch, then ``self.act``) is one: inlined, it sent every eval call of the whole graph to the
    model's own forward, so the nodes inserted after its activation never ran in eval (no
    activation figures for ``measure`` / ``report``; semi-structured's masks not applied). Run
    as it is, with its activation in a one-call graph, both modes run the nodes, and the graph
    around it no longer depends on the mode. Under SAS, inlined, it made the rewired layers read the
    relu's input in training only: the layers after it now read its output in both modes.

    >>> import torch
    >>> class BNAct(torch.nn.BatchNorm2d):
    ...     def __init__(self):
    ...         super().__init__(4); self.act = torch.nn.ReLU()
    ...     def forward(self, x):
    ...         return self.act(x if self.training else x * 2)
    >>> root = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), BNAct())
    >>> mode_split(root, {("1", "training"): True}, "", set(), lambda n, m: False, lambda n, m: n.endswith("act"))
    ['1']
    >>> mode_split(root, {("1", "training"): True}, "", set(), lambda n, m: False, None)
    []
    """
    if wraps is None:
        return []
    out = []
    for path, flag in baked:
        if flag != "training" or not path or path in forced:
            continue
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        full = f"{prefix}.{path}" if prefix else path
        inside = [(f"{full}.{name}", m) for name, m in module.named_modules() if name]
        shelled = [name for name, m in inside if wraps(name, m)]
        if shelled and not any(is_site(name, m) for name, m in inside if name not in shelled):
            out.append(path)
    return sorted(out)
