"""In-place consumers of a regularized tensor, made out of place when a regularizer node is
inserted after it (docs/methods/tl1.md): the penalty's backward reads the tensor, which an in-place
op after it would have modified. Same values, a little more memory; what reads the tensor after
such an op reads the op's result. A write through a view of it (``h[:, :2].mul_(2)``,
``h[0] = 0``) cannot be made out of place that way: :func:`written_through_alias` finds it, and the
regularizer then computes its penalty on a copy."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes import Change, reroute_later_reads, set_call

__all__ = ["make_users_out_of_place", "written_through_alias"]


# in-place users of a regularized tensor would modify what the penalty's backward reads
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                  operator.itruediv: operator.truediv}


def _out_of_place(target):
    """The out-of-place twin of an in-place torch function or ATen op (``torch.relu_``,
    ``aten.add_.Tensor``: a trailing ``_``), else None."""
    if isinstance(target, torch._ops.OpOverload):  # a torch.export graph
        name = target.overloadpacket.__name__
        packet = getattr(getattr(torch.ops, target.namespace), name[:-1], None) if name.endswith("_") else None
        return getattr(packet, target._overloadname, None)
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.endswith("__") and getattr(torch, name, None) is target:
        return getattr(torch, name[:-1], None)
    return None


def make_users_out_of_place(gm: fx.GraphModule, node: fx.Node) -> list[Change]:
    """Turn in-place consumers of ``node`` into out-of-place ones (same values); returns what changed."""
    changed = []
    for user in sorted(node.users):  # graph order
        first = user.args[0] if user.args else None
        if first is not node:
            continue
        change = None
        if user.op == "call_module":
            mod = gm.get_submodule(user.target)
            if getattr(mod, "inplace", False):
                mod.inplace = False  # a module attribute, not a graph edit: the node stays as it is
                change = Change("edit", str(user.target), "inplace=False")
        elif user.op == "call_function":
            if user.kwargs.get("inplace"):
                change = set_call(user, kwargs={"inplace": False})
            elif user.target in _INPLACE_FUNCS:
                change = set_call(user, target=_INPLACE_FUNCS[user.target])
            elif (twin := _out_of_place(user.target)) is not None:
                change = set_call(user, target=twin)
        elif user.op == "call_method":
            t = str(user.target)
            if t.endswith("_") and not t.endswith("__") and hasattr(torch.Tensor, t[:-1]):
                change = set_call(user, target=t[:-1])
        if change is None:
            continue
        changed.append(change)
        # the in-place op changed ``node`` itself: what reads ``node`` after it (``h.add_(1)`` as a
        # statement, then ``fc(h)``) must read the out-of-place result now
        changed += reroute_later_reads(node, user)
    return changed


# calls whose result shares memory with their first argument (torch.fx graphs; export graphs
# read the ATen schemas instead)
_VIEW_METHODS = {"view", "view_as", "narrow", "select", "transpose", "permute", "t", "unsqueeze", "squeeze",
                 "expand", "expand_as", "as_strided", "unflatten", "diagonal", "unbind", "split", "chunk",
                 "movedim", "swapaxes", "reshape", "flatten", "__getitem__", "detach", "real", "imag"}
_VIEW_FUNCS = {operator.getitem} | {getattr(torch, n) for n in _VIEW_METHODS if hasattr(torch, n)}


def _is_view(node: fx.Node) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):
        returns = node.target._schema.returns
        return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCS


def _writes_first(node: fx.Node) -> bool:
    """``node`` writes into its first argument (``x.mul_(2)``, ``x[i] = v``, ``aten.copy_``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        args = target._schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    if node.op == "call_method":
        t = str(target)
        return t.endswith("_") and not t.endswith("__") or t == "__setitem__"
    if node.op == "call_module":  # nn.ReLU(inplace=True) on a view
        owner = node.graph.owning_module
        return owner is not None and bool(getattr(owner.get_submodule(str(target)), "inplace", False))
    if node.op == "call_function":
        return (target is operator.setitem or target in _INPLACE_FUNCS or _out_of_place(target) is not None
                or bool(node.kwargs.get("inplace")))
    return False


def written_through_alias(node: fx.Node) -> bool:
    """Whether a later op writes into ``node``'s tensor through a view of it or item assignment,
    which would modify what the penalty's backward reads (its direct in-place users are made out of
    place first: :func:`make_users_out_of_place`).

    >>> g = fx.symbolic_trace(lambda h: h[:, :2].mul_(2)).graph
    >>> written_through_alias(next(n for n in g.nodes if n.op == "placeholder"))
    True
    """
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        for user in current.users:
            if user in seen or not user.args or user.args[0] is not current:
                continue
            seen.add(user)
            if _writes_first(user):
                return True
            if _is_view(user):
                stack.append(user)
    return False
