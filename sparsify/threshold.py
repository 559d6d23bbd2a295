"""Exact quantiles of large magnitude vectors (``torch.quantile`` refuses more than 2**24 values).

The quantile is numpy's default (linear interpolation): with ``N`` values sorted ascending and
``pos = (N - 1) * q``, it is ``v[floor(pos)] + frac(pos) * (v[floor(pos) + 1] - v[floor(pos)])``.
Pruning ``|w| <= tau`` at that value removes exactly ``floor((N - 1) * q) + 1`` weights when
there are no ties.
"""
from __future__ import annotations

import torch

__all__ = ["quantile", "pruned_count"]


def pruned_count(n: int, q: float) -> int:
    """How many of ``n`` distinct values lie at or below the ``q`` quantile.

    >>> pruned_count(11, 0.5)
    6
    """
    return int((n - 1) * q) + 1


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of a 1-D tensor of any size, via ``kthvalue``.

    >>> quantile(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0.5)
    tensor(2.5000)
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must be in [0, 1], got {q}")
    values = values.reshape(-1)
    n = values.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError("cannot threshold non-finite weights (NaN or inf): training diverged; "
                                 "lower the learning rate or check the loss")
    pos = (n - 1) * q
    k = int(pos)
    frac = pos - k
    lo = torch.kthvalue(values, k + 1).values
    if frac == 0.0 or k + 1 >= n:
        return lo
    # the next order statistic: lo again when tied, else the smallest value above lo
    at_or_below = int((values <= lo).sum())
    hi = lo if at_or_below >= k + 2 else values[values > lo].min()
    # torch.lerp rounds exactly as torch.quantile / numpy do
    out = torch.lerp(lo, hi, torch.tensor(frac, dtype=lo.dtype))
    if bool(out >= hi) and bool(hi > lo):
        # rounded up onto the next value (gap of ~1 ulp, common with millions of float32
        # weights): step one ulp back so that ``|w| <= tau`` still prunes exactly k + 1 values
        out = torch.nextafter(hi, lo)
    return out
