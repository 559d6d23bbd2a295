"""Exact quantiles of large magnitude vectors (``torch.quantile`` refuses more than 2**24 values).

The quantile is numpy's default (linear interpolation): with ``N`` values sorted ascending and
``pos = (N - 1) * q``, it is ``v[floor(pos)] + frac(pos) * (v[floor(pos) + 1] - v[floor(pos)])``.
Pruning ``|w| <= tau`` at that value removes exactly ``floor((N - 1) * q) + 1`` weights when
there are no ties.
"""
from __future__ import annotations

import torch

__all__ = ["quantile", "pruned_count", "band_quantile", "QuantileTracker"]


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
    return _interpolate(lo, hi, frac)


def _interpolate(lo: torch.Tensor, hi: torch.Tensor, frac: float) -> torch.Tensor:
    """``lo + frac * (hi - lo)`` between consecutive order statistics (shared by every exact
    quantile here, so that they agree bit for bit)."""
    # torch.lerp rounds exactly as torch.quantile / numpy do
    out = torch.lerp(lo, hi, torch.tensor(frac, dtype=lo.dtype))
    if bool(out >= hi) and bool(hi > lo):
        # rounded up onto the next value (gap of ~1 ulp, common with millions of float32
        # weights): step one ulp back so that ``|w| <= tau`` still prunes exactly k + 1 values
        out = torch.nextafter(hi, lo)
    return out


# --------------------------------------------------------------------------------------------
# fast exact quantile: count against a guess, sort only a narrow band
# --------------------------------------------------------------------------------------------

_SAMPLE = 1 << 16  # strided sample used to place the band when no usable guess is known
_MAX_BAND = 1 << 22  # beyond this many values in the band, kthvalue is as fast


def _ranks(n: int, q: float) -> tuple[int, int, float]:
    pos = (n - 1) * q
    k = int(pos)
    frac = pos - k
    return k, (k + 1 if frac != 0.0 and k + 1 < n else k), frac


def _try_band(values: torch.Tensor, k: int, k_hi: int, frac: float, lo, hi):
    """The quantile if order statistics ``k`` and ``k_hi`` (0-based) lie in ``[lo, hi]``, else
    ``None`` (band missed) or ``"wide"`` (too many values inside: sorting them would not pay)."""
    # count_nonzero is ~8x faster than bool.sum() on CPU
    below = int(torch.count_nonzero(values < lo))
    if below > k:
        return None
    band = values[(values >= lo) & (values <= hi)]
    if below + band.numel() <= k_hi:
        return None
    if band.numel() > _MAX_BAND:
        return "wide"
    band = torch.sort(band).values
    a = band[k - below]
    if k_hi == k:
        return a
    return _interpolate(a, band[k_hi - below], frac)


def _all_finite(values: torch.Tensor) -> bool:
    # one min/max pass (NaN propagates into both) instead of isfinite(...).all()'s slow path
    lo, hi = torch.aminmax(values)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def band_quantile(values: torch.Tensor, q: float, hint: float | None = None,
                  width: float | None = None) -> tuple[torch.Tensor, float]:
    """Exactly :func:`quantile` (same value, bit for bit), without sorting all the values.

    Counts the values below a narrow band ``[hint - width, hint + width]`` around a guess (the
    previous step's threshold), and sorts only the values inside it. Without a usable guess the
    band is placed from a strided sample (ranks ``k·m/n`` ± a margin, widened on a miss). Returns
    ``(quantile, width)``: pass both back next time as ``hint`` and ``width``. Only the speed
    depends on them; many tied values in the band fall back to :func:`quantile`.

    >>> v = torch.rand(100_000)
    >>> tau, w = band_quantile(v, 0.9)
    >>> bool(tau == quantile(v, 0.9))
    True
    >>> bool(band_quantile(v, 0.9, hint=float(tau), width=w)[0] == quantile(v, 0.9))
    True
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must be in [0, 1], got {q}")
    values = values.reshape(-1)
    n = values.numel()
    if n <= _SAMPLE:
        return quantile(values, q), 0.0
    if not _all_finite(values):
        raise FloatingPointError("cannot threshold non-finite weights (NaN or inf): training diverged; "
                                 "lower the learning rate or check the loss")
    k, k_hi, frac = _ranks(n, q)
    if hint is not None and width and width > 0 and hint == hint:
        lo = torch.tensor(hint - width, dtype=values.dtype)
        hi = torch.tensor(hint + width, dtype=values.dtype)
        out = _try_band(values, k, k_hi, frac, lo, hi)
        if isinstance(out, torch.Tensor):
            return out, width
    # place the band from a strided sample: ranks k/stride ± a margin of sampling error
    stride = n // _SAMPLE
    sample = torch.sort(values[::stride]).values
    m = sample.numel()
    margin = 64
    for _ in range(4):
        j_lo = max(0, (k * m) // n - margin)
        j_hi = min(m - 1, (k_hi * m) // n + margin)
        lo, hi = sample[j_lo], sample[j_hi]
        if j_lo == 0:
            lo = torch.tensor(-float("inf"), dtype=values.dtype)
        if j_hi == m - 1:
            hi = torch.tensor(float("inf"), dtype=values.dtype)
        out = _try_band(values, k, k_hi, frac, lo, hi)
        if isinstance(out, torch.Tensor):
            center = float(out)
            spread = max(center - float(lo), float(hi) - center)
            return out, (spread if spread != float("inf") else 0.0)
        if out == "wide":
            break
        margin *= 8
    return quantile(values, q), 0.0


class QuantileTracker:
    """Stateful :func:`band_quantile`: remembers the last threshold and band width.

    Nothing here changes the result (always equal to :func:`quantile`), only the speed, so it
    needs no saving: a resumed run starts from a sample and is bit-for-bit the same.

    >>> t = QuantileTracker()
    >>> v = torch.rand(200_000)
    >>> bool(t(v, 0.5) == quantile(v, 0.5)) and bool(t(v * 1.001, 0.6) == quantile(v * 1.001, 0.6))
    True
    """

    def __init__(self):
        self.last: float | None = None
        self.width: float = 0.0

    def __call__(self, values: torch.Tensor, q: float) -> torch.Tensor:
        out, width = band_quantile(values, q, self.last, self.width)
        self.last, self.width = float(out), width
        return out
