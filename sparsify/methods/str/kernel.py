"""The STR weight ``Ŵ = sign(W) ⊙ ReLU(|W| − sigmoid(s))``: the plain composition
(:func:`str_weight`, the reference) and the one-pass version with the same values and gradients
(:func:`soft_threshold`, custom autograd) that the layers use. See docs/methods/str.md, "Per-step
cost".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsify.core.buffers import eager, workspace
from sparsify.core.devices import no_autocast

__all__ = ["str_threshold", "str_weight", "soft_threshold"]


def str_threshold(s: torch.Tensor) -> torch.Tensor:
    """``sigmoid(s)`` in float32, whatever autocast or the parameter's dtype say.

    >>> str_threshold(torch.tensor(-3200.0))
    tensor(0.)
    """
    with no_autocast(s.device.type):
        return torch.sigmoid(s.float())


def str_weight(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(W) ⊙ ReLU(|W| − threshold)`` (the threshold broadcasts: scalar or per channel).

    The plain composition: the reference :func:`soft_threshold` is tested against, and what
    layers use for reduced-precision weights and under ``torch.compile`` (which fuses it).

    >>> str_weight(torch.tensor([0.5, -0.05, -0.3]), torch.tensor(0.1))
    tensor([ 0.4000, -0.0000, -0.2000])
    """
    with no_autocast(weight.device.type):
        out = torch.sign(weight) * torch.relu(weight.abs() - threshold)
    return out.to(weight.dtype)


def _shrink(weight: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W − clamp(W, −t, t)``: equal to ``sign(W)·relu(|W| − t)`` (up to the sign of zeros:
    ``±(|W| − t)`` rounds the same either way), in one pass (two with per-channel thresholds)."""
    # one kernel; float() of a CPU scalar costs no sync (softshrink refuses a NaN threshold: a
    # diverged one takes the clamp path, which gives NaN weights for sparsify.step to report)
    if threshold.numel() == 1 and weight.device.type == "cpu" and math.isfinite(lam := float(threshold)):
        if out is None:
            return F.softshrink(weight, lam)
        return torch._C._nn.softshrink(weight, lam, out=out)
    t = threshold.to(weight.dtype)
    out = torch.clamp(weight, -t, t, out=out)
    return torch.sub(weight, out, out=out)


def _signed_sum(grad: torch.Tensor, sign: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``Σ grad ⊙ sign`` reduced to ``shape`` (a scalar or ``(Cout, 1, ...)``), without
    materialising the product when the layout allows a BLAS dot product."""
    with no_autocast(grad.device.type):  # a dot product is on autocast's lists
        if grad.is_contiguous() and sign.is_contiguous():
            if all(d == 1 for d in shape):
                return torch.dot(grad.reshape(-1), sign.reshape(-1)).reshape(shape)
            if shape[0] == grad.shape[0] and all(d == 1 for d in shape[1:]):
                rows = grad.shape[0]
                return torch.bmm(grad.reshape(rows, 1, -1), sign.reshape(rows, -1, 1)).reshape(shape)
        return (grad * sign).sum_to_size(shape)


class _SoftThreshold(torch.autograd.Function):
    """Autograd for ``Ŵ = sign(W) ⊙ ReLU(|W| − t)`` given ``Ŵ`` (``eff``, computed without
    history): the gradients plain autograd gives that composition, ``∂L/∂W = ∂L/∂Ŵ ⊙
    1[|W| > t]`` (ReLU'(0) = 0) and ``∂L/∂t = −Σ ∂L/∂Ŵ ⊙ sign(Ŵ)`` over the weights sharing
    ``t``. ``Ŵ ≠ 0`` exactly where ``|W| > t``, so ``Ŵ`` (which the conv saves anyway) is all
    the backward keeps.

    ``in_place``: the incoming gradient belongs to this node alone (the layer's own conv made
    it), so the weight gradient is written into it and ``sign(Ŵ)`` into a shared scratch tensor:
    no allocation. ``pinned``: the buffer's pin, released once the backward has run."""

    @staticmethod
    def forward(ctx, weight, threshold, eff, in_place: bool, pinned):
        ctx.save_for_backward(eff)
        ctx.threshold_shape, ctx.threshold_dtype = threshold.shape, threshold.dtype
        ctx.in_place, ctx.pinned = in_place, pinned
        return eff.detach()  # an alias sharing eff's version counter

    @staticmethod
    def backward(ctx, grad):
        (eff,) = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[:2]
        gw = gt = None
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, out of place
            sign = torch.sign(eff)
            gw = grad * sign.abs() if need_w else None
            gt = -(grad * sign).sum_to_size(ctx.threshold_shape) if need_t else None
        else:
            in_place = ctx.in_place and grad.is_contiguous() and grad.dtype == eff.dtype
            sign = None
            if need_t:
                sign = torch.sign(eff, out=workspace(eff.shape, eff.dtype, eff.device)) if in_place else torch.sign(eff)
                gt = _signed_sum(grad, sign, ctx.threshold_shape).neg_()
            if need_w:
                # grad where Ŵ != 0: softshrink's own backward, one kernel (|Ŵ| > 0 ⟺ |W| > t)
                if in_place:
                    gw = torch.ops.aten.softshrink_backward.grad_input(grad, eff, 0.0, grad_input=grad)
                else:
                    gw = torch.ops.aten.softshrink_backward(grad, eff, 0.0)
        if ctx.pinned is not None:
            ctx.pinned.release()
        return gw, None if gt is None else gt.to(ctx.threshold_dtype), None, None, None


def _fast(weight: torch.Tensor, threshold: torch.Tensor) -> bool:
    """Whether :class:`_SoftThreshold` applies (else the plain composition runs)."""
    return (weight.dtype in (torch.float32, torch.float64) and threshold.dtype == torch.float32
            and weight.layout == torch.strided and eager())


def soft_threshold(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """:func:`str_weight` in one pass, with the same values and gradients (custom autograd).

    ``weight`` float32 or float64; ``threshold`` a scalar or ``(Cout, 1, ...)`` tensor, ≥ 0.

    >>> soft_threshold(torch.tensor([0.5, -0.05, -0.3]), torch.tensor(0.1))
    tensor([ 0.4000, -0.0000, -0.2000])
    """
    if weight.dtype == torch.float64:
        threshold = threshold.to(weight.dtype)
    with torch.no_grad():
        eff = _shrink(weight, threshold)
    if not (torch.is_grad_enabled() and (weight.requires_grad or threshold.requires_grad)):
        return eff
    return _SoftThreshold.apply(weight, threshold, eff, False, None)
