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

from .call_record import CallSpan
from .graph_view import first_and_last
from .select import node_name, target_module
from .tracing import TraceResult

__all__ = ["model_ends"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def model_ends(tr: TraceResult, is_compute: Callable[[nn.Module], bool],
               order: Mapping[str, CallSpan] | None = None) -> tuple[set[str], set[str]]:
    """Qualified names of the compute modules with no compute upstream (first) or downstream
    (last) in the whole of ``tr.module``.

    ``order`` (:meth:`passes.call_record.CallRecord.call_order`) says when one forward called each
    module; modules it does not list were not called then and are skipped inside untraceable
    modules. There, the earliest child and those called on the very same tensor (``q``, ``k``,
    ``v``) are first; the latest and those called on the same tensor as it (a detector's class
    and box heads) are last. Without ``order``, registration order stands in, and only the
    earliest child is first and the latest last.

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
        """The children of ``m`` that hold compute (containers looked through), in registration order."""
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
        # run as it is (untraceable, or a leaf the trace did not enter): its children's calls decide
        found = list(units(path, m))
        spans = {u[0]: s for u in found if (s := span(u[0])) is not None}
        called = sorted((u for u in found if u[0] in spans), key=lambda u: spans[u[0]][end])
        if not called:  # no record, or its children are not called as modules (MultiheadAttention)
            return ends(*found[0 if end == 0 else -1], end) if found else set()
        pick = called[0 if end == 0 else -1]
        out = ends(*pick, end)
        tok = spans[pick[0]][2 + end]
        for u in called if tok is not None else ():  # siblings reading the very tensor the end reads
            if u is not pick and spans[u[0]][2 + end] == tok:
                out |= ends(*u, end)
        return out

    def span(name: str) -> CallSpan | None:
        """When the example forward called ``name``, or, for a child never called itself whose
        parent reaches past it (OPT's ``self.model.decoder(...)``), its descendants: the earliest
        of their calls to the latest."""
        if not order:
            return None
        if name in order:
            return order[name]
        inner = [s for k, s in order.items() if k.startswith(name + ".")]
        if not inner:
            return None
        first, last = min(inner, key=lambda s: s.first), max(inner, key=lambda s: s.last)
        return CallSpan(first.first, last.last, first.first_input, last.last_input)

    if not holds(tr.module):
        return set(), set()
    return ends("", tr.module, 0), ends("", tr.module, 1)
