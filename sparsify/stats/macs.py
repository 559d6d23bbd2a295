"""Per-layer multiply-accumulate counts of Conv and Linear layers.

A layer's dense MACs per sample are ``positions × weight.numel()`` where ``positions`` is the
number of output positions per sample (spatial positions for a conv, tokens for a Linear); for
weight-sparse layers the non-zero MACs are ``positions × nnz(W)``. Padding is not discounted, the
usual convention (dense ResNet-18 at 224² = 1,814,073,344; checked against
``torch.utils.flop_counter`` in the tests).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from sparsify.core.eval_loop import internal
from sparsify.core.state import SparsifyState
from sparsify.prepare.hidden import hidden_positions
from sparsify.prepare.hidden_positions import unreached, watched_names, weight_numel
from sparsify.prepare.inputs import guess_shape, positions_per_sample, state_inputs

__all__ = ["dense_macs", "layer_factors"]


def layer_factors(state: SparsifyState, root: nn.Module) -> dict[str, float]:
    """Output positions per sample (MACs per weight element) of each Conv/Linear of ``root``, by name.

    Measured by one eval-mode forward on the example inputs: inside ``sparsify()`` when it was
    given them, else the first time a report asks (on a guessed input); stored in
    ``state.layer_factors`` (an empty dict when no input runs).
    """
    if state.layer_factors is not None:
        return state.layer_factors
    inputs = state_inputs(state, root)
    factors: dict[str, float] = {}
    if inputs is None:  # the report says which of the two reasons applies (state.macs_missing)
        shape = guess_shape(root)
        state.macs_missing = ("sparsify(...) got no example_inputs" + (
            "" if shape is None else f", and the model rejected the guessed sample (zeros of shape "
            f"{tuple(shape)}; a model of token ids or of another input size does)"))
    else:
        try:
            # the model may have moved (model.cuda()) since the inputs were given
            device = next(root.parameters()).device
            inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
            with internal():
                factors = positions_per_sample(root, inputs)
                watched = watched_names(root, state.hidden_names + unreached(root, factors))
                factors.update(hidden_positions(root, inputs, watched))
        except Exception as exc:  # MACs are a report column, never a reason to stop training
            warnings.warn(f"sparsify: could not run the example inputs to count MACs ({type(exc).__name__}: "
                          f"{exc}); the report shows no MACs")
            factors = {}
            state.macs_missing = f"the example inputs failed to run ({type(exc).__name__}, as warned)"
    state.layer_factors = factors
    return factors


def dense_macs(model: nn.Module, example_inputs: Sequence) -> int:
    """Total dense Conv/Linear MACs per sample, layers whose weight is multiplied outside their
    own call included (MultiheadAttention's projections, Swin's ``F.linear(x, qkv.weight)``).

    >>> import torchvision
    >>> dense_macs(torchvision.models.resnet18(), (torch.zeros(1, 3, 224, 224),))
    1814073344
    """
    pos = positions_per_sample(model, example_inputs)
    mods = dict(model.named_modules())
    pos.update(hidden_positions(model, example_inputs, watched_names(model, unreached(model, pos))))
    return int(round(sum(p * (weight_numel(mods, n) or 0) for n, p in pos.items())))
