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
    """``(quantile, values in band)`` if order statistics ``k`` and ``k_hi`` (0-based) lie in
    ``[lo, hi]``; ``(None, _)`` when the band missed them, ``("wide", _)`` when it holds too many
    values for sorting them to pay."""
    # two float passes (< lo, <= hi) and cheap bool ones; count_nonzero is ~8x faster than
    # bool.sum() on CPU. Misses are detected from the counts, before selecting anything.
    if bool(lo > hi):
        return None, 0
    below_mask = values < lo
    below = int(torch.count_nonzero(below_mask))
    if below > k:
        return None, 0
    upto_mask = values <= hi
    inside = int(torch.count_nonzero(upto_mask)) - below
    if below + inside <= k_hi:
        return None, inside
    if inside > _MAX_BAND:
        return "wide", inside
    band = torch.sort(values[upto_mask ^ below_mask]).values  # lo <= v <= hi (below implies upto)
    a = band[k - below]
    if k_hi == k:
        return a, inside
    return _interpolate(a, band[k_hi - below], frac), inside


def _all_finite(values: torch.Tensor) -> bool:
    # one min/max pass (NaN propagates into both) instead of isfinite(...).all()'s slow path
    lo, hi = torch.aminmax(values)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def band_quantile(values: torch.Tensor, q: float, hint: float | None = None,
                  width: float | None = None) -> tuple[torch.Tensor, float]:
    """Exactly :func:`quantile` (same value, bit for bit), without sorting all the values.

    Counts the values below a narrow band ``[hint - width, hint + width]`` around a guess (e.g.
    predicted from the previous step's threshold), and sorts only the values inside it. Without
    a guess, or when the band misses, the band is placed from a strided sample (sample ranks
    ``k·m/n`` ± a margin, widened on a miss); many tied values fall back to :func:`quantile`.
    Only the speed depends on ``hint`` and ``width``. Returns ``(quantile, density)``: the number
    of values per unit around the quantile (0.0 when unknown), to size the next band.

    >>> v = torch.rand(100_000)
    >>> tau, density = band_quantile(v, 0.9)
    >>> bool(tau == quantile(v, 0.9))
    True
    >>> bool(band_quantile(v, 0.9, hint=float(tau), width=100 / density)[0] == quantile(v, 0.9))
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

    def density(inside, lo, hi):
        span = float(hi) - float(lo)
        return inside / span if 0 < span < float("inf") else 0.0

    if hint is not None and width and width > 0 and hint == hint:
        lo = torch.tensor(hint - width, dtype=values.dtype)
        hi = torch.tensor(hint + width, dtype=values.dtype)
        out, inside = _try_band(values, k, k_hi, frac, lo, hi)
        if isinstance(out, torch.Tensor):
            return out, density(inside, lo, hi)
    # place the band from a strided sample: ranks k/stride ± a margin of sampling error
    stride = n // _SAMPLE
    sample = torch.sort(values[::stride]).values
    m = sample.numel()
    # 4 standard deviations of a sample rank (binomial), so that one try almost always hits
    margin = int(4 * (m * q * (1 - q)) ** 0.5) + 16
    for _ in range(4):
        j_lo = max(0, (k * m) // n - margin)
        j_hi = min(m - 1, (k_hi * m) // n + margin)
        lo, hi = sample[j_lo], sample[j_hi]
        if j_lo == 0:
            lo = torch.tensor(-float("inf"), dtype=values.dtype)
        if j_hi == m - 1:
            hi = torch.tensor(float("inf"), dtype=values.dtype)
        out, inside = _try_band(values, k, k_hi, frac, lo, hi)
        if isinstance(out, torch.Tensor):
            return out, density(inside, lo, hi)
        if out == "wide":
            break
        margin *= 8
    return quantile(values, q), 0.0


class QuantileTracker:
    """Stateful :func:`band_quantile` for a threshold recomputed every step: the band is centred
    where the previous threshold and the local density predict the new one, about
    ``max(2048, n/2048)`` ranks wide on each side.

    Nothing here changes the result (always equal to :func:`quantile`), only the speed, so it
    needs no saving: a resumed run starts from a sample and is bit-for-bit the same.

    >>> t = QuantileTracker()
    >>> v = torch.rand(200_000)
    >>> bool(t(v, 0.5) == quantile(v, 0.5)) and bool(t(v * 1.001, 0.6) == quantile(v * 1.001, 0.6))
    True
    """

    def __init__(self):
        self.last: float | None = None
        self.last_rank = 0
        self.density = 0.0

    def __call__(self, values: torch.Tensor, q: float) -> torch.Tensor:
        n = values.numel()
        k = int((n - 1) * q)
        hint = width = None
        if self.last is not None and self.density > 0:
            shift = k - self.last_rank
            hint = self.last + shift / self.density
            width = (max(2048, n >> 11) + abs(shift) / 2) / self.density
        out, density = band_quantile(values, q, hint, width)
        self.last, self.last_rank = float(out), k
        self.density = density or self.density
        return out
