"""Rewrite primitives on a ``GraphModule``; each returns the :class:`Change` it made.

They edit the graph in place and leave recompiling to the caller (the pipeline does it once
per pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

__all__ = ["Change", "replace_module", "insert_after", "reroute_input", "erase_dead",
           "set_submodule", "unique_name"]


@dataclass(frozen=True)
class Change:
    """One edit, as logged by the pipeline: what kind, on which node/module, and details."""

    kind: str  # "replace", "insert", "reroute", "erase"
    target: str
    detail: str = ""


def set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``qualname`` under ``root`` (parents must exist)."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def unique_name(root: nn.Module, wanted: str) -> str:
    """``wanted`` or ``wanted_1``, ``wanted_2``, ... whichever is not a submodule of ``root`` yet."""
    names = {n for n, _ in root.named_modules()}
    if wanted not in names:
        return wanted
    i = 1
    while f"{wanted}_{i}" in names:
        i += 1
    return f"{wanted}_{i}"


def replace_module(gm: fx.GraphModule, node: fx.Node, new: nn.Module) -> Change:
    """Swap the module a ``call_module`` node calls; the node and its name stay.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> replace_module(gm, list(gm.graph.nodes)[1], torch.nn.GELU()).kind
    'replace'
    """
    if node.op != "call_module":
        raise ValueError(f"replace_module needs a call_module node, got {node.op} {node.name}")
    old = gm.get_submodule(node.target)
    set_submodule(gm, node.target, new)
    return Change("replace", str(node.target), f"{type(old).__name__} -> {type(new).__name__}")


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str,
                 *, reroute_users: bool = True) -> tuple[fx.Node, Change]:
    """Add ``module`` under the qualified name ``name`` (made unique) and call it on ``node``'s
    output right after ``node``. With ``reroute_users`` every former user of ``node`` now reads the
    new node instead.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> new, change = insert_after(gm, list(gm.graph.nodes)[1], torch.nn.Identity(), "probe")
    >>> change.target
    'probe'
    """
    name = unique_name(gm, name)
    parent_name = name.rpartition(".")[0]
    if parent_name:
        gm.get_submodule(parent_name)  # raises with a clear message when the parent is missing
    set_submodule(gm, name, module)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "tensor_meta")})
    if reroute_users:
        for user in users:
            user.replace_input_with(node, new)
    return new, Change("insert", name, f"after {node.name}: {type(module).__name__}")


def reroute_input(user: fx.Node, old: fx.Node, new: fx.Node) -> Change:
    """Make ``user`` read ``new`` wherever it read ``old``."""
    user.replace_input_with(old, new)
    return Change("reroute", user.name, f"input {old.name} -> {new.name}")


def erase_dead(gm: fx.GraphModule) -> list[Change]:
    """Remove nodes without users and without side effects (``Graph.eliminate_dead_code``)."""
    before = {n.name for n in gm.graph.nodes}
    gm.graph.eliminate_dead_code()
    after = {n.name for n in gm.graph.nodes}
    return [Change("erase", name) for name in sorted(before - after)]
