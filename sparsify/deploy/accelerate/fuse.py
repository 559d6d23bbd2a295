"""Epilogue fusion for direct sparse convs: what reads a :class:`DirectSparseConv2d`'s output
only once is done in the conv's own pass over its output, instead of in another pass over memory.

* a residual connection's add, ``conv(x) + y`` (``y`` of the output's shape: ResNet's
  ``out += identity``), becomes ``conv(x, y)``;
* a ReLU that is the only reader of the conv's (or the fused add's) output sets ``relu``.

In order, as the graph computes them: ``relu(conv(x) + y)``. At batch 1 a ResNet-50 at 95%
spends a tenth of its accelerated time in these adds and ReLUs (docs/performance.md).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes import insert_call, replace_uses

from sparsify.deploy.accelerate.direct_conv import DirectSparseConv2d
from sparsify.deploy.accelerate.graph_edits import erase, is_relu, only_user, qual, rewrite_graphs

__all__ = ["fuse_residual_pass", "fuse_relu_pass", "add_operands"]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_IN_PLACE = (operator.iadd, "add_")


def add_operands(node: fx.Node) -> tuple[object, object] | None:
    """``(a, b)`` when ``node`` computes ``a + b`` (no ``alpha``, no ``out``), else None.

    >>> gm = fx.symbolic_trace(lambda x, y: x + y)
    >>> [n.name for n in add_operands(list(gm.graph.nodes)[2])]
    ['x', 'y']
    """
    if node.kwargs or len(node.args) != 2:
        return None
    if (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("add", "add_")):
        return node.args[0], node.args[1]
    return None


def _single_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) == 1


def _fusion_pass(model, rows, fuse, note: str) -> None:
    """Run ``fuse(gm, node, erased) -> bool`` on every call of a direct sparse conv that has no
    ReLU yet, and add ``note`` to the report row of every conv it fused something into."""
    fused = set()

    def rewrite(prefix, gm, node, erased) -> bool:
        conv = gm.get_submodule(node.target)
        if not isinstance(conv, DirectSparseConv2d) or conv.relu or not fuse(gm, node, erased):
            return False
        fused.add(qual(prefix, str(node.target)))
        return True

    rewrite_graphs(model, rewrite)
    for r in rows:
        if r.name in fused:
            r.reason += note


def fuse_residual_pass(model, rows) -> None:
    """``conv(x) + y`` -> ``conv(x, y)`` where the add is the conv output's only reader and ``y``
    is another value (an in-place add only where it updates the conv's output)."""

    def fuse(gm, node, erased) -> bool:
        if len(node.args) != 1 or node.kwargs:
            return False
        add = only_user(node)
        operands = None if add is None else add_operands(add)
        if operands is None or not _single_call(gm, node):
            return False
        a, b = operands
        other = b if a is node else a if b is node else None
        if not isinstance(other, fx.Node) or other is node or (add.target in _IN_PLACE and a is not node):
            return False  # an in-place add into `other` must keep updating it
        new, _ = insert_call(gm, add, "call_module", node.target, (node.args[0], other), before=True,
                             meta_from=add)
        replace_uses(add, new)
        erase(gm, add, erased, new)
        erase(gm, node, erased, keep_module=True)  # the new call uses the same module
        return True

    _fusion_pass(model, rows, fuse, "; residual add fused")


def fuse_relu_pass(model, rows) -> None:
    """A ReLU that is the only reader of a direct sparse conv's output is applied in its pass."""

    def fuse(gm, node, erased) -> bool:
        relu_node = only_user(node)
        if relu_node is None or not is_relu(gm, relu_node) or relu_node.args[0] is not node:
            return False
        if not _single_call(gm, node):
            return False
        gm.get_submodule(node.target).relu = True
        erase(gm, relu_node, erased, node, keep_module=True)  # the ReLU module may serve other nodes
        return True

    _fusion_pass(model, rows, fuse, "; ReLU fused")
