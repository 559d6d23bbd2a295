"""Small fx graph edits shared by the acceleration passes (each edit itself goes through
``passes``): find a node's single reader, recognise a ReLU, erase a node, and run a rewrite over
every GraphModule of a model."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from passes import remove_node

__all__ = ["qual", "only_user", "is_relu", "erase", "rewrite_graphs"]


def qual(prefix: str, local: str) -> str:
    """The qualified name in the whole model of the submodule ``local`` of the GraphModule at
    ``prefix`` (``""`` for the root).

    >>> qual("layer1.0", "conv1"), qual("", "conv1")
    ('layer1.0.conv1', 'conv1')
    """
    return f"{prefix}.{local}" if prefix else local


def only_user(node: fx.Node) -> fx.Node | None:
    """The node that reads ``node``'s output when it is the only one (a fusion may then rewrite
    both), else ``None``.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> x, conv, relu, out = gm.graph.nodes
    >>> only_user(conv), only_user(relu)
    (_1, output)
    """
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies a plain ReLU: a call of an ``nn.ReLU`` module (not a subclass), or
    ``torch.relu`` / ``torch.relu_`` / ``F.relu`` / ``.relu()`` / ``.relu_()``.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.ReLU6()))
    >>> [is_relu(gm, n) for n in gm.graph.nodes]
    [False, True, False, False]
    """
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":  # in place or not: the conv output has no other reader
        return node.target in (torch.relu, torch.relu_, torch.nn.functional.relu)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def erase(gm: fx.GraphModule, node: fx.Node, erased: set[fx.Node], replacement: fx.Node | None = None,
           *, keep_module: bool = False) -> None:
    """Erase ``node`` (its users read ``replacement``) and its module unless another node calls it
    or ``keep_module``, and mark it for the walk."""
    remove_node(gm, node, replacement, delete_module=not keep_module)
    erased.add(node)


def rewrite_graphs(model: nn.Module, rewrite) -> None:
    """Call ``rewrite(prefix, gm, node, erased) -> changed`` on each call_module node of every fx
    GraphModule in ``model``, skipping the nodes a rewrite erased (it adds them to ``erased``);
    every graph a rewrite changed is linted and recompiled."""
    for prefix, gm in list(model.named_modules()):
        if not isinstance(gm, fx.GraphModule):
            continue
        changed = False
        erased: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node not in erased:
                changed |= rewrite(prefix, gm, node, erased)
        if changed:
            gm.graph.lint()
            gm.recompile()
