"""``W ⊙ M`` for a bool mask, gradients included, written into a scratch tensor and reused while
neither the weight nor the mask changes (the magnitude methods' and ST-3's effective weight).
Apart from the layer mixin because it is one speed path with its own autograd function, reached
only through the layer's scratch and cache methods.
"""
from __future__ import annotations

import torch
from torch import nn  # noqa: F401  (the example below runs in this namespace)

from sparsify.core.buffers import eager, layer_buffers

__all__ = ["masked_weight"]


class _MaskedProduct(torch.autograd.Function):
    """Forward: ``W ⊙ M`` computed beforehand (``product``). Backward: ``grad ⊙ M`` to ``W``."""

    @staticmethod
    def forward(ctx, weight, product, mask_f):
        ctx.save_for_backward(mask_f)
        return product

    @staticmethod
    def backward(ctx, grad):
        (mask_f,) = ctx.saved_tensors
        return grad * mask_f, None, None


def masked_weight(layer: "SparseWeightMixin", mask: torch.Tensor) -> torch.Tensor:
    """``layer.weight * mask`` (a bool mask), gradients included: the same values and gradients,
    but the product is written into a scratch tensor and reused until the weight or the mask
    changes, and both products use a float copy of the mask (mixed bool/float multiplies are
    several times slower on CPU).

    >>> from sparsify.methods.magnitude import MAGNITUDE_CLASSES
    >>> layer = MAGNITUDE_CLASSES[nn.Linear].from_dense(nn.Linear(2, 1))
    >>> mask = torch.tensor([[True, False]])
    >>> bool(torch.equal(masked_weight(layer, mask), layer.weight * mask))
    True
    """
    w = layer.weight
    # eager() first: compiled code must not read the buffers' weak map (dynamo guarded on its
    # keys, so other models' layers coming and going recompiled, or crashed building the guard)
    if not eager() or ((bufs := layer_buffers(layer, create=False)) is not None and bufs.transient):
        # the same values and gradients; autograd keeps the bool mask, not a float copy
        return w * mask
    mask_f = layer.cached("mask_f", mask)
    if mask_f is None:
        # bool -> float copies are ~8x slower than uint8 -> float ones (same bytes)
        src = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_f = layer.store_cached("mask_f", layer.scratch("mask_f", w).copy_(src), mask)
    product = layer.cached("masked", w, mask)
    if product is None:
        with torch.no_grad():
            product = torch.mul(w, mask_f, out=layer.scratch("masked", w))
        layer.store_cached("masked", product, w, mask)
    return _MaskedProduct.apply(w, product, mask_f)
