"""Regularized activations no gradient reaches: a penalty on an activation that only frozen layers
(``requires_grad=False``) compute is a constant, so an activation regularizer there trains nothing.
Weight recipes leave frozen layers dense with a reason; an activation site is kept (unfreezing it
later makes it train) and said in the plan and once at ``sparsify()``."""
from __future__ import annotations

import torch
from torch import fx, nn

__all__ = ["frozen_before", "FROZEN_BEFORE", "frozen_before_warning"]

#: the plan's note on such a site
FROZEN_BEFORE = ("no gradient reaches it: no trainable layer computes it (only frozen ones, requires_grad=False, "
                 "or the inputs alone), its penalty is a constant")


def frozen_before(gm: fx.GraphModule, node: fx.Node, whole_model: bool, known: set | None = None) -> bool:
    """Whether no trainable parameter computes ``node`` of ``gm`` (``whole_model``: ``gm`` is the
    root graph, whose placeholders are the model's inputs; a submodule's graph takes values from
    outside, which may be trained, so it is never judged frozen). ``known``: nodes found so before,
    not walked again (a frozen backbone's every activation would walk it all), and added to.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).requires_grad_(False)
    >>> gm = fx.symbolic_trace(net)
    >>> relu = next(n for n in gm.graph.nodes if n.target == "1")
    >>> frozen_before(gm, relu, True), frozen_before(gm, relu, False)
    (True, False)
    """
    known = set() if known is None else known
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in known:
            continue
        seen.add(n)
        if n.op == "placeholder" and not whole_model:
            return False
        if n.op in ("call_module", "get_attr"):
            value = _attribute(gm, n.target)
            if isinstance(value, nn.Module) and any(p.requires_grad for p in value.parameters()):
                return False
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return False
        todo.extend(n.all_input_nodes)
    known |= seen
    return True


def _attribute(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def frozen_before_warning(names: list[str]) -> str:
    """The one warning at ``sparsify()`` for the regularized activations :func:`frozen_before` found.

    >>> frozen_before_warning(["relu", "relu_1"])[:62]
    'sparsify: 2 regularized activation(s) get no gradient (first: '
    """
    return (f"sparsify: {len(names)} regularized activation(s) get no gradient (first: {names[0]}): no trainable "
            "layer computes them (only frozen ones, requires_grad=False, or the inputs alone), so their penalty is a "
            "constant that trains nothing; "
            "unfreeze those layers before sparsify(), or regularize activations that trainable layers compute")
