"""Which compute layers come first and last in the whole model when it was traced in pieces.

:func:`passes.graph_view.first_and_last` answers inside one graph. A model that ``torch.fx``
could not trace as a whole (a transformers model: every decoder layer is run as it is, its
attention and MLP traced on their own) is a tree of graphs and untraceable modules; asking each
graph on its own calls every MLP's first layer "first" and its last layer "last", and a recipe
that keeps the model's ends dense keeps every block's MLP dense. :func:`model_ends` walks that
tree instead: inside a graph, data flow decides (a submodule holding compute layers is one step of
it); inside a module run as it is, the order in which it calls its children does (recorded from
the example call, else the order they were registered in).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch.fx as fx
from torch import nn

from .graph_view import first_and_last
from .select import node_name, target_module
from .tracing import TraceResult

__all__ = ["model_ends"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def model_ends(tr: TraceResult, is_compute: Callable[[nn.Module], bool],
               order: Mapping[str, tuple[int, int]] | None = None) -> tuple[set[str], set[str]]:
    """Qualified names of the compute modules with no compute upstream (first) or downstream
    (last) in the whole of ``tr.module``.

    ``order`` maps a module's qualified name to the indices of its first and last call in one
    forward (:meth:`passes.calls.CallRecord.call_order`); modules it does not list were not called
    then and are skipped inside untraceable modules. Without it, registration order stands in:
    inside an untraceable module, layers called one after the other on independent inputs (``q``,
    ``k``, ``v``) cannot be told from a chain, so only the earliest counts as first.

    >>> import torch
    >>> from passes.tracing import trace
    >>> class Opaque(torch.nn.Module):  # a loop over children that torch.fx cannot trace
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
    ...                                                               torch.nn.Linear(4, 4)) for _ in range(2))
    ...     def forward(self, x):
    ...         for b in self.blocks[: int(x.shape[0])]:
    ...             x = b(x)
    ...         return x
    >>> tr = trace(Opaque())
    >>> [f.name for f in tr.fallbacks], sorted(tr.graphs)
    ([''], ['blocks.0', 'blocks.1'])
    >>> model_ends(tr, lambda m: isinstance(m, torch.nn.Linear))
    ({'blocks.0.0'}, {'blocks.1.2'})
    """
    fallbacks = {f.name for f in tr.fallbacks}
    holds_cache: dict[int, bool] = {}

    def holds(m: nn.Module) -> bool:
        if id(m) not in holds_cache:
            holds_cache[id(m)] = any(is_compute(x) for x in m.modules())
        return holds_cache[id(m)]

    def units(path: str, m: nn.Module):
        """The children an untraceable ``m`` calls that hold compute (containers looked through)."""
        for name, child in m.named_children():
            full = f"{path}.{name}" if path else name
            if not holds(child):
                continue
            if isinstance(child, _CONTAINERS) and full not in tr.graphs and full not in fallbacks:
                yield from units(full, child)
            else:
                yield full, child

    def ends(path: str, m: nn.Module, end: int) -> set[str]:
        if is_compute(m):
            return {path}
        gm = tr.graphs.get(path)
        if isinstance(gm, fx.GraphModule):
            picked = first_and_last(gm, lambda n, mod: mod is not None and holds(mod))[end]
            out: set[str] = set()
            for node in gm.graph.nodes:
                if node.name in picked:
                    out |= ends(node_name(node, path), target_module(gm, node), end)
            return out
        if path in fallbacks or isinstance(m, _CONTAINERS):
            found = list(units(path, m))
            if order:
                found = sorted((u for u in found if u[0] in order), key=lambda u: order[u[0]][end])
            if not found:
                return set()
            return ends(*found[0 if end == 0 else -1], end)
        # a leaf that holds compute layers (not traced into): its first / last one in registration order
        inside = [f"{path}.{n}" if path else n for n, x in m.named_modules() if n and is_compute(x)]
        return {inside[0 if end == 0 else -1]} if inside else set()

    if not holds(tr.module):
        return set(), set()
    return ends("", tr.module, 0), ends("", tr.module, 1)
