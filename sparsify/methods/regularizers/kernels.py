"""Penalty sums of the activation regularizers with few passes and no large temporaries.

Each regularizer computes a scalar over an activation map of millions of elements in every
training forward, and its gradient in the backward. Written as plain tensor expressions
(``t = x.abs(); ((1 + a) * t / (a + t)).sum()``) that is three fresh activation-sized tensors in
the forward and about six in the backward, and on CPU a fresh large tensor costs page faults
worth ten elementwise passes. So here:

- on CPU the map is processed in chunks of ``CHUNK`` elements through small work buffers that
  are reused (at most three per thread, 4 MiB each): every pass over a chunk hits the cache and
  the forward allocates nothing activation-sized; the backward allocates exactly one tensor, the
  gradient it returns;
- on other devices (whose caching allocators make temporaries cheap, and where one kernel per
  small chunk would be slow) the same code runs on the whole map as one chunk;
- arithmetic is float32 whatever the activation dtype (bfloat16/float16 under autocast are
  converted chunk by chunk); float64 inputs stay float64, so ``torch.autograd.gradcheck`` works;
- ``nonneg=True`` (the input is a ReLU output) skips the ``abs`` and the sign handling;
- the backward is the analytic derivative, equal to what autograd gives for the plain
  composition, including 0 at ``x == 0`` (the subgradient ``sign(0) = 0``);
- while a tracer runs (torch.compile, export, make_fx, functorch transforms: see
  :func:`sparsify.core.buffers.eager`) the callers use :func:`plain_penalty`, the same value as whole-tensor
  ops that tracers and compilers understand (and fuse themselves).

Only the input tensor is saved for the backward, and the activation's own backward keeps it
alive anyway: no extra activation memory.

>>> x = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
>>> p = tl1_sum(x, a=1.0)
>>> p
tensor(2.5000, grad_fn=<_TL1SumBackward>)
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparsify.core.buffers import workspace

__all__ = ["tl1_sum", "l1_sum", "hoyer_square", "plain_penalty", "CHUNK"]

# elements per CPU chunk: the chunk and its work buffers (4 MiB each) stay in the last-level cache
# while the three or four passes over it run. Measured on the 2-core dev machine (ResNet-18 maps,
# batch 32, 112x112): 2^18..2^21 cost the same on one thread; on two threads 2^20 was faster than
# 2^18 (fewer ops, so less fork/join and Python per op)
CHUNK = 1 << 20

_INF = float("inf")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _work(k: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The k-th work buffer (``n`` elements): the thread's workspace
    (:func:`sparsify.core.buffers.workspace`; per thread, because DataParallel replicas share modules)."""
    return workspace((n,), dtype, device, index=k)


def _flat(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor | None:
    """A 1-D view of ``t`` in memory order (the order of ``like``'s strides), or None if there is none."""
    if like is None and t.is_contiguous():
        return t.view(-1)
    ref = like if like is not None else t
    order = sorted(range(ref.dim()), key=lambda d: -ref.stride(d))
    p = t.permute(order)
    return p.view(-1) if p.is_contiguous() else None


def _chunk_size(x: torch.Tensor) -> int:
    return CHUNK if x.device.type == "cpu" else max(x.numel(), 1)


def _reduce(x: torch.Tensor, per_chunk) -> torch.Tensor:
    """``Σ_chunks sum(per_chunk(src, w0, w1))``: src = the chunk in the compute dtype, w0/w1 = work buffers."""
    cdt = _compute_dtype(x)
    flat = _flat(x)
    if flat is None:  # not dense in any order (a strided view): one copy
        flat = x.contiguous().view(-1)
    size = min(_chunk_size(x), max(flat.numel(), 1))
    w0, w1 = _work(0, size, cdt, x.device), _work(1, size, cdt, x.device)
    parts = []
    for c in flat.split(size):
        m = c.numel()
        b0, b1 = (w0, w1) if m == size else (w0[:m], w1[:m])
        if c.dtype != cdt:
            c = b0.copy_(c)
        parts.append(per_chunk(c, b0, b1).sum())
    if not parts:
        return torch.zeros((), dtype=cdt, device=x.device)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _map(x: torch.Tensor, per_chunk) -> torch.Tensor:
    """A tensor like ``x`` (dtype, strides) whose chunks are ``per_chunk(src, dst, w)`` computed in
    the compute dtype (src: the chunk of x; dst: where to write; w: a spare work buffer)."""
    cdt = _compute_dtype(x)
    out = torch.empty_like(x)
    if x.is_contiguous() and out.is_contiguous():
        fx, fo = x.view(-1), out.view(-1)
    else:
        fx, fo = _flat(x), _flat(out, like=x)
    if fx is None or fo is None:
        x = x.contiguous()
        out = torch.empty_like(x)
        fx, fo = x.view(-1), out.view(-1)
    size = min(_chunk_size(x), max(fx.numel(), 1))
    w0, w1, w2 = (_work(k, size, cdt, x.device) for k in range(3))
    for c, o in zip(fx.split(size), fo.split(size)):
        m = c.numel()
        b0, b1, b2 = (w0, w1, w2) if m == size else (w0[:m], w1[:m], w2[:m])
        if c.dtype != cdt:
            c = b1.copy_(c)
        dst = o if o.dtype == cdt else b0
        per_chunk(c, dst, b2)
        if dst is not o:
            o.copy_(dst)
    return out


def plain_penalty(x: torch.Tensor, function: str, a: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """The penalties as plain whole-tensor expressions (autograd differentiates them); the
    reference the kernels are tested against, and what runs under tracers and compilers.

    >>> float(plain_penalty(torch.tensor([0.0, 1.0, 3.0]), "tl1", a=1.0))
    2.5
    """
    xf = x.to(_compute_dtype(x))
    t = xf.abs()
    if function == "tl1":
        return (t / (t + a)).sum() * ((1.0 + a) * scale)
    if function == "l1":
        return t.sum() * scale
    if function == "hoyer":
        s1, s2 = t.sum(), (xf * xf).sum()
        return torch.where(s2 > 0, s1 * s1 / s2.clamp_min(1e-30), torch.zeros_like(s2)) * scale
    raise ValueError(f"unknown penalty function {function!r}")


# ---------------------------------------------------------------------------------------------
# Transformed-ℓ1: Σ (1 + a)|x| / (a + |x|)
# ---------------------------------------------------------------------------------------------

class _TL1Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, scale, nonneg):
        ctx.save_for_backward(x)
        ctx.a, ctx.scale, ctx.nonneg = a, scale, nonneg

        def chunk(c, w0, w1):
            if not nonneg:
                c = torch.abs(c, out=w0)
            torch.add(c, a, out=w1)
            return torch.div(c, w1, out=w1)  # |x| / (a + |x|): no cancellation for small |x|

        # (1 + a) and the reduction's scale factor out of the sum
        return _reduce(x, chunk) * ((1.0 + a) * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a, nonneg = ctx.a, ctx.nonneg
        k = grad * (a * (1.0 + a) * ctx.scale)  # a 0-dim tensor: no device sync

        def chunk(c, dst, w):
            # dρ/dx = a(1+a)·sign(x)/(a+|x|)²; |x| = 0 becomes inf first, so the power gives 0 there
            if nonneg:
                torch.threshold(c, 0.0, _INF, out=dst)
            else:
                torch.abs(c, out=dst)
                torch.threshold(dst, 0.0, _INF, out=dst)
            dst.add_(a).pow_(-2).mul_(k)
            if not nonneg:
                dst.mul_(torch.sign(c, out=w))  # sign + mul: faster than copysign_ on CPU

        return _map(x, chunk), None, None, None


def tl1_sum(x: torch.Tensor, a: float = 1.0, scale: float = 1.0, nonneg: bool = False) -> torch.Tensor:
    """``scale · Σ (1 + a)|x| / (a + |x|)`` as a float32 scalar (float64 for float64 ``x``).

    ``nonneg=True`` promises ``x >= 0`` (a ReLU output): one pass fewer each way.

    >>> float(tl1_sum(torch.tensor([0.0, 1.0, 3.0]), a=1.0))
    2.5
    """
    return _TL1Sum.apply(x, float(a), float(scale), bool(nonneg))


# ---------------------------------------------------------------------------------------------
# ℓ1: Σ |x|
# ---------------------------------------------------------------------------------------------

def _abs_sum(x: torch.Tensor, nonneg: bool) -> torch.Tensor:
    cdt = _compute_dtype(x)
    if x.dtype == cdt:  # one pass, no temporary: the norm kernel reduces |x| directly
        return x.sum() if nonneg else torch.linalg.vector_norm(x, 1)
    return _reduce(x, lambda c, w0, w1: c if nonneg else torch.abs(c, out=w0))


class _L1Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, nonneg):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return _abs_sum(x, nonneg) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        k = grad * ctx.scale

        def chunk(c, dst, w):
            torch.sign(c, out=dst).mul_(k)

        return _map(x, chunk), None, None


def l1_sum(x: torch.Tensor, scale: float = 1.0, nonneg: bool = False) -> torch.Tensor:
    """``scale · Σ |x|`` as a float32 scalar (float64 for float64 ``x``).

    >>> float(l1_sum(torch.tensor([-1.0, 0.0, 2.0])))
    3.0
    """
    return _L1Sum.apply(x, float(scale), bool(nonneg))


# ---------------------------------------------------------------------------------------------
# Hoyer-square: (Σ|x|)² / Σx²
# ---------------------------------------------------------------------------------------------

def _square_sum(x: torch.Tensor) -> torch.Tensor:
    # not vector_norm(x, 2)²: the square of the rounded root is off in the last bit
    return _reduce(x, lambda c, w0, w1: torch.mul(c, c, out=w1))


class _HoyerSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, nonneg):
        s1, s2 = _abs_sum(x, nonneg), _square_sum(x)
        ctx.save_for_backward(x, s1, s2)
        ctx.scale = scale
        # 0 for an all-zero map (its limit along any ray is undefined; 0 keeps the loss finite)
        return torch.where(s2 > 0, s1 * s1 / s2.clamp_min(1e-30), torch.zeros_like(s2)) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, s1, s2 = ctx.saved_tensors
        # an all-zero map gets a zero gradient; decided on the device (no host sync on a GPU)
        pos = s2 > 0
        r = torch.where(pos, s1 / s2, torch.zeros_like(s2))
        k1 = torch.where(pos, grad * (2.0 * ctx.scale) * r, torch.zeros_like(r))  # d/dx = 2 r·sign(x) - 2 r²·x,
        k2 = -k1 * r  # r = Σ|x| / Σx²

        def chunk(c, dst, w):
            torch.sign(c, out=dst).mul_(k1).addcmul_(c, k2)

        return _map(x, chunk), None, None


def hoyer_square(x: torch.Tensor, scale: float = 1.0, nonneg: bool = False) -> torch.Tensor:
    """``scale · (Σ|x|)² / Σx²`` as a float32 scalar (float64 for float64 ``x``; 0 if ``x`` is all zero).

    >>> float(hoyer_square(torch.tensor([1.0, 0.0, -1.0])))
    2.0
    """
    return _HoyerSquare.apply(x, float(scale), bool(nonneg))
