"""The gradients of an N:M layer's ``W ⊙ M``: straight-through to every latent weight (plus
SR-STE's decay of the pruned ones) while the mask moves, the hard mask's once it is fixed."""
from __future__ import annotations

import torch

from sparsify.core.buffers import workspace


class _MaskedStraightThrough(torch.autograd.Function):
    """Forward ``W ⊙ M``; backward: the gradient to every W, plus ``decay·(1−M)⊙W`` (SR-STE), or,
    where the 0-d bool tensor ``fixed`` is given and true, the hard mask's ``grad ⊙ M``.

    The plain version (a bool mask, fresh tensors): what tracers and transforms run, and the
    reference :class:`_NMWeight` is tested against. ``fixed`` serves ``torch.compile``: both
    phases in one graph, the flag read by tensor ops only. Written with ``setup_context`` and
    ``generate_vmap_rule``, as torch.func's transforms (per-sample gradients) require."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask, decay: float, fixed=None):
        return weight * mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, mask, decay, fixed = (*inputs, None)[:4]
        ctx.decay = decay
        ctx.save_for_backward(weight if decay else None, mask if decay or fixed is not None else None, fixed)

    @staticmethod
    def backward(ctx, grad):
        weight, mask, fixed = ctx.saved_tensors
        out = grad + ctx.decay * weight * ~mask if ctx.decay else grad
        if fixed is not None:
            out = torch.where(fixed, grad * mask, out)
        return out, None, None, None


class _NMWeight(torch.autograd.Function):
    """Autograd for ``Ŵ = W ⊙ M`` given ``Ŵ`` (``eff``) and the float mask ``mask_f``.

    ``straight``: the straight-through gradient (plus SR-STE's ``decay·(1−M)⊙W``, computed as
    ``decay·(W − Ŵ)``: the same numbers); else the hard mask's ``grad ⊙ M``. ``in_place``: the
    incoming gradient belongs to this node alone (the layer's own conv made it) and is edited in
    place: no allocation. ``pinned``: the buffer's pin, released once the backward ran."""

    @staticmethod
    def forward(ctx, weight, eff, mask_f, straight: bool, decay: float, in_place: bool, pinned):
        ctx.straight, ctx.decay, ctx.in_place, ctx.pinned = straight, decay, in_place, pinned
        # what the backward reads, and eff always: a pinned buffer is released through it
        sr_ste = straight and bool(decay)
        ctx.save_for_backward(weight if sr_ste else None, eff, mask_f if sr_ste or not straight else None)
        return eff.detach()  # an alias sharing eff's version counter

    @staticmethod
    def backward(ctx, grad):
        weight, eff, mask_f = ctx.saved_tensors
        if mask_f is not None and mask_f.dtype == torch.bool:  # FSDP2 saved the bool mask (mask_float)
            mask_f = mask_f.to(grad.dtype)
        in_place = (ctx.in_place and not torch.is_grad_enabled() and grad.is_contiguous()
                    and grad.dtype == eff.dtype)
        if ctx.straight and ctx.decay:
            if in_place:
                pruned = torch.sub(weight, eff, out=workspace(eff.shape, eff.dtype, eff.device))
                gw = grad.add_(pruned.mul_(ctx.decay))
            else:
                gw = grad + ctx.decay * weight * (1 - mask_f)  # differentiable in weight, as the reference
        elif ctx.straight:
            gw = grad
        else:
            gw = grad.mul_(mask_f) if in_place else grad * mask_f
        if ctx.pinned is not None:
            ctx.pinned.release()
        return gw, None, None, None, None, None, None
