"""The ReLU rewiring: a selected layer fed by a relu reads the relu's input instead; the relu
stays only for its other users."""
from __future__ import annotations


import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes import Change, copy_chain, insert_call, remove_node, replace_uses, reroute_input, reroute_later_reads
from passes.hooks import CALL_HOOKS
from sparsify.core.contract import HOOKED



# --------------------------------------------------------------------------------------------

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
# ops g with relu(g(x)) == g(relu(x)): the relu can be moved past them without changing anything
_EXACT_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                  nn.Dropout2d, nn.Dropout3d)
_EXACT_OPS = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
              "adaptive_max_pool3d", "flatten", "reshape", "view", "contiguous", "squeeze", "unsqueeze",
              "dropout", "dropout1d", "dropout2d", "dropout3d"}
# averaging ops: looking through them (the official ResNet head) changes the function
_AVERAGE_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d)
_AVERAGE_OPS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "mean"}


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _raw_name(node: fx.Node) -> str | None:
    """The called function's or method's name; an aten op (a graph captured with torch.export)
    by its name without the overload (``aten.mean.dim`` -> ``mean``)."""
    if node.op == "call_function":
        return getattr(getattr(node.target, "overloadpacket", node.target), "__name__", "")
    if node.op == "call_method":
        return str(node.target)
    return None


def _fn_name(node: fx.Node) -> str | None:
    name = _raw_name(node)
    return name.strip("_") if node.op == "call_function" else name


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``nn.ReLU`` calls, ``F.relu`` / ``torch.relu`` (in place or not) and ``x.relu()``."""
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _relu_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(_module(gm, node).inplace)
    if node.op == "call_method":
        return node.target == "relu_"
    if node.target in (torch.relu_, F.relu_):
        return True
    return bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))


def _pass_through(gm: fx.GraphModule, node: fx.Node, through_average: bool) -> str | None:
    """``"exact"`` / ``"average"`` when a relu may be looked through ``node``, else None."""
    if node.op == "call_module":
        mod = _module(gm, node)
        if isinstance(mod, _EXACT_MODULES):
            if getattr(mod, "return_indices", False) or getattr(mod, "inplace", False):
                return None
            return "exact"
        if through_average and isinstance(mod, _AVERAGE_MODULES):
            return "average"
        return _chain_kind(mod, through_average)
    name = _fn_name(node)
    if name is None or _raw_name(node).endswith("_") or node.kwargs.get("return_indices") or \
            node.kwargs.get("inplace"):  # an in-place op changes its input, which the relu also feeds
        return None
    if name in _EXACT_OPS:
        return "exact"
    return "average" if through_average and name in _AVERAGE_OPS else None


def _chain_kind(mod: nn.Module, through_average: bool) -> str | None:
    """A parameter-free container whose forward is a chain of ops a relu may be looked through
    (timm's ``SelectAdaptivePool2d``: its ``pool`` then its ``flatten``): the chain's kind, else None.

    >>> pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    >>> _chain_kind(pool, True), _chain_kind(pool, False)
    ('average', None)
    """
    if next(mod.parameters(), None) is not None or next(mod.children(), None) is None:
        return None
    try:
        sub = fx.symbolic_trace(mod)
    except Exception:  # an untraceable forward: nothing known about it
        return None
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    cur, kind = placeholders[0], "exact"
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            return kind if n.args[0] is cur else None
        step = _pass_through(sub, n, through_average)
        if step is None or not n.args or n.args[0] is not cur or len(cur.users) != 1:
            return None
        kind = "average" if step == "average" else kind
        cur = n
    return None


def find_relu_input(gm: fx.GraphModule, node: fx.Node, through_average: bool = False):
    """For the layer call ``node``: ``(relu node, ops between it and the layer, exact)`` when its
    input is a relu output, looking through ops that commute with relu (max pooling, flatten,
    reshapes, dropout) and, with ``through_average``, through average pooling; else None.
    ``exact`` is False when an average pool was crossed.

    >>> seq = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 1, 1))
    >>> gm = fx.symbolic_trace(seq)
    >>> relu, chain, exact = find_relu_input(gm, list(gm.graph.nodes)[3])
    >>> relu.target, [n.target for n in chain], exact
    ('0', ['1'], True)
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    cur, chain, exact = node.args[0], [], True
    for _ in range(16):
        if _returns_input(gm, cur) and cur.args and isinstance(cur.args[0], fx.Node) and is_relu(gm, cur.args[0]):
            cur = cur.args[0]  # an observer right after the relu (a regularizer): the relu's output as is
        if is_relu(gm, cur):
            if not cur.args or not isinstance(cur.args[0], fx.Node):
                return None
            return cur, chain[::-1], exact
        kind = _pass_through(gm, cur, through_average)
        if kind is None or not cur.args or not isinstance(cur.args[0], fx.Node):
            return None
        exact = exact and kind == "exact"
        chain.append(cur)
        cur = cur.args[0]
    return None


def mode_branching_source(gm: fx.GraphModule, node: fx.Node, through_average: bool = False) -> str | None:
    """The local path of the module whose output the layer call ``node`` reads (through the ops
    :func:`find_relu_input` looks through) when that module holds a ReLU and runs as it is because
    its forward branches on ``self.training`` (``passes.mode_branches.mode_split``: timm's
    ``BatchNormAct2d``), else None. Its relu cannot be rewired: inlined, the graph would hold the
    training branch and the layer would read the relu's input in training mode only.

    >>> class BNAct(nn.Module):  # timm's BatchNormAct2d, in short
    ...     def __init__(self):
    ...         super().__init__(); self.act = nn.ReLU()
    ...     def forward(self, x):
    ...         return self.act(x if self.training else x * 2)
    >>> class Leaves(fx.Tracer):
    ...     def is_leaf_module(self, m, name): return True
    >>> root = nn.Sequential(BNAct(), nn.Conv2d(2, 2, 1))
    >>> gm = fx.GraphModule(root, Leaves().trace(root))
    >>> gm.__dict__["_mode_split"] = ("0",)  # as passes.trace marks the modules mode_split keeps whole
    >>> mode_branching_source(gm, list(gm.graph.nodes)[2])
    '0'
    """
    split = gm.__dict__.get("_mode_split", ())
    cur = node.args[0] if node.args else None
    for _ in range(16):
        if not isinstance(cur, fx.Node):
            return None
        if cur.op == "call_module" and cur.target in split:
            return cur.target if any(type(m) is nn.ReLU for m in _module(gm, cur).modules()) else None
        if _pass_through(gm, cur, through_average) is None or not cur.args:
            return None
        cur = cur.args[0]
    return None


# what each of the hook dictionaries that act around a call (passes.hooks.CALL_HOOKS) is called in a message
_HOOK_KINDS = dict(zip(CALL_HOOKS, ("forward pre-hook", "forward hook", "backward pre-hook", "backward hook")))


def _hook_kinds(module: nn.Module, kinds=tuple(_HOOK_KINDS)) -> list[str]:
    return [_HOOK_KINDS[k] for k in kinds if module.__dict__.get(k)]


def hooks_in_the_way(gm: fx.GraphModule, node: fx.Node, layer: nn.Module, found) -> str | None:
    """Why rewiring ``layer`` (called at ``node``) past the relu ``found`` (:func:`find_relu_input`)
    would change what the caller's hooks do, or None. Hooks on the relu or on an op between it and
    the layer would no longer act on (or see) what the layer reads; a forward pre-hook on the
    layer would see the relu's input, and a full backward hook the gradient of it.

    >>> seq = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Conv2d(1, 1, 1))
    >>> _ = seq[1].register_forward_hook(lambda m, a, out: out + 1)
    >>> gm = fx.symbolic_trace(seq); node = list(gm.graph.nodes)[3]
    >>> hooks_in_the_way(gm, node, seq[2], find_relu_input(gm, node)).split(":")[0]
    'left dense for the hooks registered on relu 1 (forward hook)'
    """
    relu, chain, _ = found
    for n in (relu, *chain):
        mod = _module(gm, n)
        if mod is not None and (kinds := _hook_kinds(mod)):
            what = "relu" if n is relu else "op"
            return (f"{HOOKED} {what} {n.target} ({', '.join(kinds)}): rewired to read the relu's input, the layer "
                    "would bypass them")
    if kinds := _hook_kinds(layer, ("_forward_pre_hooks", "_backward_hooks")):
        return (f"{HOOKED} it ({', '.join(kinds)}): rewired, the layer reads the relu's input, so they would see "
                "another input (and its gradient) than they do now")
    return None


def _returns_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module call that returns its input unchanged and only observes it (an activation
    regularizer, ``returns_input = True``): SAS looks through it to the relu it observes."""
    return node.op == "call_module" and getattr(type(_module(gm, node)), "returns_input", False)


def _non_negative(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the layer's input is known to be >= 0 (a relu output, through exact ops)."""
    found = find_relu_input(gm, node)
    return found is not None


def _make_relu_out_of_place(gm: fx.GraphModule, relu: fx.Node, changes: list[Change]) -> fx.Node:
    """Replace an in-place relu by ``torch.relu``. Users of its input placed after it saw the
    mutated (relu'd) tensor: they now read the relu's output, which is the same value."""
    if not _relu_inplace(gm, relu):
        return relu
    x = relu.args[0]
    changes.extend(reroute_later_reads(x, relu))
    new, change = insert_call(gm, relu, "call_function", torch.relu, (x,), meta_from=relu)
    changes.append(change)
    changes.append(remove_node(gm, relu, new, detail=f"in-place relu -> torch.relu ({new.name}) so that its "
                                                     "input stays the pre-activation"))
    return new


def _rewire(gm: fx.GraphModule, node: fx.Node, relu: fx.Node, chain: list[fx.Node], exact: bool,
            changes: list[Change]) -> str:
    """Feed ``node`` (the SAS layer) the relu's input, passed through a copy of ``chain``."""
    relu = _make_relu_out_of_place(gm, relu, changes)
    relu_name = str(relu.target) if relu.op == "call_module" else relu.name
    pre = relu.args[0]
    # what the chain (or the layer) reads: the relu, or an observer of its output that stays put
    out = (chain[0] if chain else node).args[0]
    if not chain:
        changes.append(reroute_input(node, out, pre))
    else:
        copies, copied = copy_chain(gm, chain, out, pre)
        changes.extend(copied)
        changes.append(reroute_input(node, chain[-1], copies[-1]))
        end = chain[-1]
        if exact and end.users:
            # relu commutes with the chain: its other users get relu(chain(x)), the same values
            r, change = insert_call(gm, copies[-1], "call_function", torch.relu, (copies[-1],), meta_from=end)
            changes.append(change)
            changes.append(replace_uses(end, r))
        for op in reversed(chain):
            if not op.users:
                changes.append(remove_node(gm, op))
    if not relu.users:
        changes.append(remove_node(gm, relu, detail="relu without users after the SAS rewiring"))
    return f"rewired from relu {relu_name}" + (f" through {', '.join(n.name for n in chain)}" if chain else "")


# --------------------------------------------------------------------------------------------
# method and group
# --------------------------------------------------------------------------------------------
