"""In-place consumers of a regularized tensor, made out of place when a regularizer node is
inserted after it (docs/methods/tl1.md): the penalty's backward reads the tensor, which an in-place
op after it would have modified. Same values, a little more memory; what reads the tensor after
such an op reads the op's result."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes import Change, reroute_later_reads, set_call

__all__ = ["make_users_out_of_place"]


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
