"""A networkx view of an fx graph, and the analyses built on it."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .select import Predicate, target_module

__all__ = ["to_networkx", "compute_nodes", "first_and_last"]


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A ``DiGraph`` with one vertex per fx node (keyed by node name) and an edge per data use.

    Vertex attributes: ``op``, ``target``, ``node`` (the fx node itself).

    >>> import torch
    >>> g = to_networkx(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU())))
    >>> sorted(g.edges)
    [('_0', 'output'), ('input_1', '_0')]
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=n.target, node=n)
    for n in gm.graph.nodes:
        for src in n.all_input_nodes:
            g.add_edge(src.name, n.name)
    return g


def compute_nodes(gm: fx.GraphModule, is_compute: Predicate) -> list[fx.Node]:
    """Nodes satisfying ``is_compute`` (called with each node and the module it calls, or
    ``None``) in topological (graph) order.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    >>> [n.target for n in compute_nodes(gm, lambda node, mod: isinstance(mod, torch.nn.Linear))]
    ['0', '2']
    """
    return [n for n in gm.graph.nodes if is_compute(n, target_module(gm, n))]


def first_and_last(gm: fx.GraphModule, is_compute: Predicate,
                   graph: nx.DiGraph | None = None) -> tuple[set[str], set[str]]:
    """Names of compute nodes with no compute node upstream (first) or downstream (last).

    With branches there can be several of each (e.g. the heads of a multi-output model).
    ``graph`` is :func:`to_networkx` of ``gm``, when the caller already has it.

    >>> import torch
    >>> class TwoHeads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         x = self.stem(x).relu()
    ...         return self.a(x), self.b(x)
    >>> first, last = first_and_last(torch.fx.symbolic_trace(TwoHeads()),
    ...                              lambda node, mod: isinstance(mod, torch.nn.Linear))
    >>> sorted(first), sorted(last)
    (['stem'], ['a', 'b'])
    """
    graph = graph if graph is not None else to_networkx(gm)
    compute = {n.name for n in compute_nodes(gm, is_compute)}
    order = list(nx.topological_sort(graph))
    # one sweep each way: "is there a compute node strictly upstream / downstream of v"
    up = {}
    for v in order:
        up[v] = any(up[p] or p in compute for p in graph.predecessors(v))
    down = {}
    for v in reversed(order):
        down[v] = any(down[s] or s in compute for s in graph.successors(v))
    return {c for c in compute if not up[c]}, {c for c in compute if not down[c]}
