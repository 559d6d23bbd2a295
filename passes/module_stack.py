"""Which modules' code a node of a traced graph comes from (torch.fx's ``nn_module_stack``)."""
from __future__ import annotations

import torch.fx as fx

__all__ = ["enclosing_modules", "module_path_of", "traced_through"]


def enclosing_modules(node: fx.Node) -> list[str]:
    """Qualified names (from the traced root, outermost first) of the modules whose forward
    created ``node``; a leaf's own ``call_module`` node is not inside the leaf.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU())))
    >>> [enclosing_modules(n) for n in gm.graph.nodes if n.op == "call_module"]
    [['0']]
    """
    paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return [p for p in paths if p]


def module_path_of(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ("" at the root).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> module_path_of(list(gm.graph.nodes)[1])
    '0'
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def traced_through(graph: fx.Graph) -> frozenset[str]:
    """Paths of the modules whose forward code ``graph`` holds (traced through, not leaves).

    >>> import torch
    >>> sorted(traced_through(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU()))).graph))
    ['0']
    """
    # a node a pass inserted after a leaf's call copies that call's module stack, the leaf
    # included (semi-structured's mask after a conv): a module the graph calls is not traced through
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    return frozenset(path for n in graph.nodes for path in enclosing_modules(n) if path not in called)
