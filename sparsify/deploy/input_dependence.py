"""Whether the sparse model ignores its input: finalize's check warns when it answers different
example inputs alike (a layer whose outputs or activations are all zero). Kept out of finalize.py
because it judges the trained model, not finalize's work, with forwards (and one backward) of its
own."""
from __future__ import annotations

import torch
from torch import nn

from passes import kept_state

from sparsify.deploy.compare import answered_alike, flatten_tensors, rolled, same_outputs
from sparsify.core.eval_loop import internal, samples_in


def _answered_alike(source: nn.Module, inputs: tuple, expected) -> int:
    """How many different inputs ``source`` (in eval mode) answered alike: the example batch's
    samples, or, for a batch of one, the sample and the sample rolled by one along its last
    dimension (one more forward); 0 when it told them apart, that cannot be seen, or the output
    still has a gradient with respect to a float input (an untrained net's input-dependent part
    rounded away beside its bias: alike, but not cut off from its input)."""
    try:
        with kept_state(source), internal():
            if samples_in(inputs) != 1:
                n = answered_alike(inputs, expected)
            else:
                other = rolled(inputs)
                n = 2 if other is not None and same_outputs(expected, source(*other)) else 0
            return n if n and not _reaches_input(source, inputs) else 0
    except Exception:  # a model that rejects the rolled input (positions, masks) is not judged
        return 0


def _reaches_input(source: nn.Module, inputs: tuple) -> bool:
    """Whether a random projection of ``source``'s output has a non-zero gradient with respect to
    one of its floating inputs (one forward and backward, only for a model that answered alike)."""
    given = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
             for t in inputs]
    leaves = [t for t in given if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return False
    with torch.enable_grad():
        outs = [t for t in flatten_tensors(source(*given)) if t.is_floating_point() and t.requires_grad]
        if not outs:
            return False
        g = torch.Generator(device=outs[0].device).manual_seed(0)
        projection = sum((t * torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype)).sum() for t in outs)
        grads = torch.autograd.grad(projection, leaves, allow_unused=True)
    return any(d is not None and bool(d.ne(0).any()) for d in grads)
