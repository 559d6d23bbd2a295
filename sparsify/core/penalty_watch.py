"""Whether the penalty reached the backward pass.

``sparsify.penalty(model)`` collects the regularizers' terms (and forgets them), so the tensor it
returns is the only way their gradient reaches the model. Two common loops lose it without an
error: adding ``penalty.item()`` (or a detached copy) to the loss, and calling ``penalty()`` once
to log it and again for the loss (the second call finds nothing left and returns 0.0). The
regularizer then does nothing. A hook on each returned tensor notes that a gradient passed
through it; at the next ``sparsify.step``, :func:`unreached_penalty` says when none did.
"""
from __future__ import annotations

import torch

__all__ = ["watch_penalty", "unreached_penalty"]


def _counts(state) -> list[int]:
    counts = state.__dict__.get("penalty_counts")
    if counts is None:  # a state saved before this was tracked
        counts = state.__dict__["penalty_counts"] = [0, 0]  # returned, reached by a gradient
    return counts


def watch_penalty(state, total: torch.Tensor) -> None:
    """Note ``total`` (a penalty ``sparsify.penalty`` returned) as waiting for its gradient."""
    if not total.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(total):
        return  # torch.func transforms run their own autograd: nothing to hook
    counts = _counts(state)
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
    returned, reached = counts
    counts[0] = counts[1] = 0
    if not returned or reached:
        return None
    return ("sparsify.step: the penalty returned by sparsify.penalty() got no gradient before this step, so the "
            "regularizers did nothing: the loss that was backpropagated did not include it (.item() or .detach() "
            "of it, or a second penalty() call, which returns 0.0 since the first one collected the terms); add "
            "the tensor of one penalty() call per forward to the loss, and log that tensor's value")
