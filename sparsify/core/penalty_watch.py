"""The penalty's terms as the groups give them, and whether the penalty reached the backward pass.

``sparsify.penalty(model)`` collects the regularizers' terms (and forgets them), so the tensor it
returns is the only way their gradient reaches the model. Two common loops lose it without an
error: adding ``penalty.item()`` (or a detached copy) to the loss, and calling ``penalty()`` once
to log it and again for the loss (the second call finds nothing left and returns 0.0). The
regularizer then does nothing. A hook on each returned tensor notes that a gradient passed
through it; at the next ``sparsify.step``, :func:`unreached_penalty` says when none did.
"""
from __future__ import annotations

import torch

__all__ = ["penalty_terms", "watch_penalty", "unreached_penalty", "CONSTANT_PENALTY"]

#: the warning when every penalty since the last step was a constant (a frozen backbone)
CONSTANT_PENALTY = ("sparsify.step: the penalty returned by sparsify.penalty() has no gradient, so the activation "
                    "regularizers train nothing: the regularized activations get no gradient (only frozen layers, "
                    "requires_grad=False, before them); unfreeze those layers, or regularize activations that "
                    "trainable layers compute")


def penalty_terms(state) -> tuple[list[torch.Tensor], bool]:
    """Every group's :meth:`~sparsify.core.contract.Group.penalty` as a one-element tensor, for
    :func:`~sparsify.core.records.penalty_sum`: a one-element tensor as it is, a Python number as a
    constant; anything else is an error naming the method and the group. Also whether some group
    gave a tensor (a term the forwards computed).

    >>> from types import SimpleNamespace as NS
    >>> state = NS(groups={"rule0_mine": NS(method_name="mine", penalty=lambda: torch.ones(2))})
    >>> penalty_terms(state)
    Traceback (most recent call last):
    ...
    TypeError: sparsify.penalty: mine (rule0_mine): penalty() returned a tensor of shape (2,); it must return a scalar tensor (the term added to the loss), a number, or None
    """
    terms, device = [], None
    for name, group in state.groups.items():
        p = group.penalty()
        if p is None:
            continue
        if isinstance(p, (int, float)) and not isinstance(p, bool):
            p = torch.tensor(float(p))  # put beside the tensors below
        elif not isinstance(p, torch.Tensor) or p.numel() != 1:
            got = f"a tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else f"a {type(p).__name__}"
            raise TypeError(f"sparsify.penalty: {group.method_name} ({name}): penalty() returned {got}; it must "
                            "return a scalar tensor (the term added to the loss), a number, or None")
        else:
            device = device or p.device
        terms.append(p.reshape(()))
    return ([t.to(device) for t in terms], True) if device is not None else (terms, False)


def _counts(state) -> list[int]:
    counts = state.__dict__.get("penalty_counts")
    if counts is None:  # a state saved before this was tracked
        counts = state.__dict__["penalty_counts"] = [0, 0, 0]
    counts.extend([0] * (3 - len(counts)))  # one saved before the constants were counted
    return counts  # returned, reached by a gradient, computed by the forwards with none to get


def watch_penalty(state, total: torch.Tensor, computed: bool = True) -> None:
    """Note ``total`` (a penalty ``sparsify.penalty`` returned) as waiting for its gradient;
    ``computed``: some term came from the forwards (not only numbers a group returned)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(total):
        return  # torch.func transforms run their own autograd: nothing to hook
    counts = _counts(state)
    if not total.requires_grad:
        # terms are recorded only by training forwards with gradients on (records.py): a constant
        # one means the regularized activations had no gradient
        counts[2] += computed
        return
    counts[0] += 1

    def reached(grad):
        counts[1] += 1
    total.register_hook(reached)


def unreached_penalty(state) -> str | None:
    """The warning when penalties were returned since the last call and none got a gradient;
    then starts counting again. One that did is enough: a loop may collect and drop the terms of
    extra forwards (an adversarial attack's) before the forward whose penalty it trains with.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), "tl1")
    >>> _ = m(torch.randn(2, 4)); p = sparsify.penalty(m); print(p.item() > 0)  # logged, never added
    True
    >>> unreached_penalty(m.sparsify_state)[:73]
    'sparsify.step: the penalty returned by sparsify.penalty() got no gradient'
    """
    counts = _counts(state)
    returned, reached, constant = counts
    counts[:] = [0, 0, 0]
    if constant and not returned:
        return CONSTANT_PENALTY
    if not returned or reached:
        return None
    return ("sparsify.step: the penalty returned by sparsify.penalty() got no gradient before this step, so the "
            "regularizers did nothing: the loss that was backpropagated did not include it (.item() or .detach() "
            "of it, or a second penalty() call, which returns 0.0 since the first one collected the terms); add "
            "the tensor of one penalty() call per forward to the loss, and log that tensor's value")
