"""Rewrite primitives on a ``GraphModule``; each returns the :class:`Change` it made.

They edit the graph in place and leave recompiling to the caller (the pipeline does it once
per pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

__all__ = ["Change", "recast", "replace_module", "insert_after", "insert_call", "reroute_input", "reroute_later_reads",
           "replace_uses",
           "remove_node", "copy_chain", "set_call", "set_submodule", "unique_name"]


@dataclass(frozen=True)
class Change:
    """One edit, as logged by the pipeline: what kind, on which node/module, and details."""

    kind: str  # "replace", "insert", "reroute", "erase", "edit"
    target: str
    detail: str = ""


def recast(module: nn.Module, cls: type, own: tuple[str, ...]) -> nn.Module:
    """A ``cls`` instance holding ``module``'s attributes, parameters and children (the same
    objects), with copies of the containers named in ``own`` (``"_parameters"``, ``"_modules"``,
    hook dictionaries, ...) so that adding to the new module leaves ``module`` as it is.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> new = recast(lin, torch.nn.Linear, ("_parameters", "_forward_pre_hooks"))
    >>> new.weight is lin.weight, new._parameters is lin._parameters, new._buffers is lin._buffers
    (True, False, True)
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in own:
        if key in module.__dict__:
            new.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    return new


def set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``qualname`` under ``root`` (parents must exist),
    replacing whatever module was there.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU()))
    >>> set_submodule(m, "0.0", torch.nn.GELU()); m[0][0]
    GELU(approximate='none')
    """
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def unique_name(root: nn.Module, wanted: str) -> str:
    """``wanted`` or ``wanted_1``, ``wanted_2``, ... whichever is not a submodule of ``root`` yet
    (the first free one, compared with the qualified names of ``root.named_modules()``).

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.ReLU())
    >>> m.add_module("probe", torch.nn.Identity())
    >>> unique_name(m, "probe"), unique_name(m, "mask")
    ('probe_1', 'mask')
    """
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

    ``module`` never goes into an ``nn.ModuleList``, ``nn.ModuleDict`` or ``nn.Sequential`` (whose
    positions and keys are the user's, and a Sequential called on its own would run ``module`` after
    its last layer): ``blocks.0_probe`` is put at ``blocks_0_probe`` on the module holding ``blocks``.
    """
    name = unique_name(gm, _outside_containers(gm, name))
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


def _outside_containers(gm: fx.GraphModule, name: str) -> str:
    """``name`` moved up out of every ``nn.ModuleList`` / ``nn.ModuleDict`` / ``nn.Sequential`` it
    would be put in, the container's name joined to its own (``blocks.0_probe`` -> ``blocks_0_probe``)."""
    parent, _, leaf = name.rpartition(".")
    while parent and isinstance(gm.get_submodule(parent), (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
        parent, _, last = parent.rpartition(".")
        leaf = f"{last}_{leaf}"
    return f"{parent}.{leaf}" if parent else leaf


def reroute_input(user: fx.Node, old: fx.Node, new: fx.Node) -> Change:
    """Make ``user`` read ``new`` wherever it read ``old``; the other users of ``old`` keep reading it.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> x, relu, tanh, out = gm.graph.nodes
    >>> reroute_input(tanh, relu, x)
    Change(kind='reroute', target='_1', detail='input _0 -> input_1')
    >>> tanh.args
    (input_1,)
    """
    user.replace_input_with(old, new)
    return Change("reroute", user.name, f"input {old.name} -> {new.name}")


def reroute_later_reads(value: fx.Node, writer: fx.Node) -> list[Change]:
    """Make the users of ``value`` placed after ``writer`` read ``writer`` instead: once an in-place
    op ``writer`` on ``value`` is made out of place, what read the updated ``value`` after it reads
    the op's result (the same values).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x: x.relu_() + x)
    >>> x, relu, add, out = gm.graph.nodes
    >>> [c.detail for c in reroute_later_reads(x, relu)], add.args
    (['input x -> relu_'], (relu_, relu_))
    """
    return [reroute_input(user, value, writer) for user in list(value.users) if user is not writer and user > writer]


def insert_call(gm: fx.GraphModule, anchor: fx.Node, op: str, target, args: tuple = (), kwargs: dict | None = None,
                *, before: bool = False, meta_from: fx.Node | None = None) -> tuple[fx.Node, Change]:
    """Add a ``call_function`` / ``call_method`` / ``get_attr`` node right after (or ``before``)
    ``anchor``; nothing reads it yet. ``meta_from`` copies a node's ``meta`` (module stack, shapes).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> relu = list(gm.graph.nodes)[1]
    >>> new, change = insert_call(gm, relu, "call_function", torch.neg, (relu,))
    >>> change.kind, sorted(u.name for u in relu.users)
    ('insert', ['neg', 'output'])
    """
    where = gm.graph.inserting_before(anchor) if before else gm.graph.inserting_after(anchor)
    with where:
        new = gm.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
    if meta_from is not None:
        new.meta.update(meta_from.meta)
    what = getattr(target, "__name__", str(target))
    return new, Change("insert", new.name, f"{op} {what} {'before' if before else 'after'} {anchor.name}")


def replace_uses(old: fx.Node, new: fx.Node) -> Change:
    """Make every user of ``old`` read ``new`` instead (``new`` itself excepted, so a node added
    after ``old`` that reads it can take its place).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> x, relu, out = gm.graph.nodes
    >>> with gm.graph.inserting_after(relu):
    ...     neg = gm.graph.call_function(torch.neg, (relu,))
    >>> replace_uses(relu, neg).detail, out.args, neg.args
    ('every use -> neg', (neg,), (_0,))
    """
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return Change("reroute", old.name, f"every use -> {new.name}")


def remove_node(gm: fx.GraphModule, node: fx.Node, replacement: fx.Node | None = None, *,
                delete_module: bool = False, detail: str = "") -> Change:
    """Erase ``node``; its users first read ``replacement`` (default: its first input, which
    suits identity-like calls). ``delete_module`` also removes the module a ``call_module`` node
    called (when no other node calls it).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU()))
    >>> remove_node(gm, list(gm.graph.nodes)[1], delete_module=True).kind
    'erase'
    >>> [n.op for n in gm.graph.nodes], hasattr(gm, "0")
    (['placeholder', 'call_module', 'output'], False)
    """
    if node.users:
        replacement = replacement if replacement is not None else node.args[0]
        node.replace_all_uses_with(replacement)
    target = node.target
    gm.graph.erase_node(node)
    if delete_module and node.op == "call_module" and not any(
            n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(str(target))
    return Change("erase", node.name, detail or (f"users read {replacement.name}" if replacement is not None else ""))


def copy_chain(gm: fx.GraphModule, chain: list[fx.Node], old_input: fx.Node,
               new_input: fx.Node) -> tuple[list[fx.Node], list[Change]]:
    """Copy the nodes of ``chain`` (each reading the previous one, the first reading
    ``old_input``) so that the copies compute the same ops on ``new_input``; each copy is placed
    before its original, and nothing reads the copies yet (a ``call_module`` copy calls the same
    module). Returns the copies and one Change each.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> x, relu, tanh, out = gm.graph.nodes
    >>> with gm.graph.inserting_after(x):
    ...     neg = gm.graph.call_function(torch.neg, (x,))
    >>> copies, changes = copy_chain(gm, [relu, tanh], x, neg)
    >>> [(c.target, c.args) for c in copies], changes[0].detail
    ([('0', (neg,)), ('1', (_0_1,))], 'copy of _0 on neg')
    """
    copies, changes = [], []
    prev, prev_new = old_input, new_input
    for op in chain:
        with gm.graph.inserting_before(op):
            new = gm.graph.node_copy(op, lambda n, p=prev, q=prev_new: q if n is p else n)
        changes.append(Change("insert", new.name, f"copy of {op.name} on {new_input.name}"))
        copies.append(new)
        prev, prev_new = op, new
    return copies, changes


def set_call(node: fx.Node, *, target=None, kwargs: dict | None = None) -> Change:
    """Change what ``node`` calls (``target``) and/or update its keyword arguments.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x: torch.relu(x))
    >>> set_call(list(gm.graph.nodes)[1], target=torch.sigmoid).detail
    'target relu -> sigmoid'
    """
    parts = []
    if target is not None:
        name = lambda t: getattr(t, "__name__", str(t))  # noqa: E731
        parts.append(f"target {name(node.target)} -> {name(target)}")
        node.target = target
    if kwargs:
        parts.append(", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
        node.kwargs = {**node.kwargs, **kwargs}
    return Change("edit", node.name, "; ".join(parts))
