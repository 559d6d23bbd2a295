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
    out = torch.lerp(lo, hi, torch.tensor(frac, dtype=lo.dtype, device=lo.device))
    if bool(out >= hi) and bool(hi > lo):
        # rounded up onto the next value (gap of ~1 ulp, common with millions of float32
        # weights): step one ulp back so that ``|w| <= tau`` still prunes exactly k + 1 values
        out = torch.nextafter(hi, lo)
    return out


# --------------------------------------------------------------------------------------------
# fast exact quantile: count against a guess, sort only a narrow band
# --------------------------------------------------------------------------------------------

_SAMPLE = 1 << 16  # strided sample used to place the band when no usable guess is known
# beyond this many values in the band, kthvalue over all values is as fast; the limit grows with
# the number of values (1/64 of them): a sample-placed first band on 600 M weights holds ~6 M,
# and the kthvalue fallback would concatenate them all (+10 GB peak, 15 s, measured)
_MAX_BAND = 1 << 22
_MAX_BAND_SHARE = 64


def _ranks(n: int, q: float) -> tuple[int, int, float]:
    pos = (n - 1) * q
    k = int(pos)
    frac = pos - k
    return k, (k + 1 if frac != 0.0 and k + 1 < n else k), frac


def _parts(values) -> list[torch.Tensor]:
    """``values`` (one tensor or a sequence of tensors) as a list of flat tensors of one dtype."""
    parts = [values.reshape(-1)] if isinstance(values, torch.Tensor) else [v.reshape(-1) for v in values]
    if not parts:
        raise ValueError("quantile of an empty tensor")
    if len({p.dtype for p in parts}) > 1:
        raise TypeError(f"all parts must have one dtype, got {sorted({str(p.dtype) for p in parts})}")
    return parts


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_ROW = 64  # values per row when locating the band's values (rows without any are skipped)


class _Scratch:
    """Two float32 buffers reused by every band search of a tracker (sized to the largest part)."""

    def __init__(self):
        self.bufs: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bufs is None or self.bufs[0].numel() < n or self.bufs[0].device != device:
            self.bufs = (torch.empty(n, device=device), torch.empty(n, device=device))
        return self.bufs[0][:n], self.bufs[1][:n]


def _count(p: torch.Tensor, lo, hi, scratch: _Scratch):
    """``(values < lo, values in [lo, hi], in-band count per row of _ROW values, in the tail)``
    of one part, as float tensors (exact: small integers summed in float64)."""
    # comparisons written as float32 0/1 are ~4x faster than bool outputs on CPU
    below_f, upto_f = scratch.get(p.numel(), p.device)
    torch.lt(p, lo, out=below_f)
    torch.le(p, hi, out=upto_f)
    m = p.numel() - p.numel() % _ROW
    below_rows = below_f[:m].view(-1, _ROW).sum(1)
    rows = upto_f[:m].view(-1, _ROW).sum(1).sub_(below_rows)  # lo <= v <= hi, per row
    below_tail = below_f[m:].sum()
    tail = upto_f[m:].sum() - below_tail
    return below_rows.sum(dtype=torch.float64) + below_tail, rows.sum(dtype=torch.float64) + tail, rows, tail


def _select(p: torch.Tensor, lo, hi, rows: torch.Tensor, tail) -> torch.Tensor:
    """The values of ``p`` in ``[lo, hi]``, reading only the rows that hold some."""
    m = p.numel() - p.numel() % _ROW
    hit_rows = torch.nonzero(rows).squeeze(1)
    if 4 * hit_rows.numel() > rows.numel():  # most rows: gathering them would cost more
        return p[(p >= lo) & (p <= hi)]
    hit = p[:m].view(-1, _ROW)[hit_rows].reshape(-1)
    if float(tail):
        hit = torch.cat([hit, p[m:]])
    return hit[(hit >= lo) & (hit <= hi)]


def _try_band(parts: list[torch.Tensor], k: int, k_hi: int, frac: float, lo, hi, scratch: _Scratch):
    """``(quantile, the band's values sorted)`` if order statistics ``k`` and ``k_hi`` (0-based)
    of all ``parts`` together lie in ``[lo, hi]``; ``(None, _)`` when the band missed them,
    ``("wide", _)`` when it holds too many values for sorting them to pay."""
    if bool(lo > hi):
        return None, 0
    counts = [_count(p, lo, hi, scratch) for p in parts]
    below = int(sum(c[0] for c in counts))
    inside = int(sum(c[1] for c in counts))
    if below > k or below + inside <= k_hi:
        return None, inside
    if inside > max(_MAX_BAND, sum(p.numel() for p in parts) // _MAX_BAND_SHARE):
        return "wide", inside
    # the order of the parts does not matter to a sort
    band = torch.sort(_cat([_select(p, lo, hi, c[2], c[3]) for p, c in zip(parts, counts)])).values
    a = band[k - below]
    if k_hi == k:
        return a, band
    return _interpolate(a, band[k_hi - below], frac), band


def _all_finite(parts: list[torch.Tensor]) -> bool:
    # a finite sum (in float32: one fast pass) proves every value finite: NaN and ±inf reach it;
    # a non-finite sum may be an overflow, so only then look at the extremes
    for p in parts:
        if p.numel() and not bool(torch.isfinite(p.sum())):
            lo, hi = torch.aminmax(p)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                return False
    return True


def band_quantile(values, q: float, hint: float | None = None, width: float | None = None,
                  scratch: _Scratch | None = None) -> tuple[torch.Tensor, float]:
    """Exactly :func:`quantile` (same value, bit for bit), without sorting all the values.

    ``values`` is a tensor or a sequence of tensors of one dtype (e.g. each layer's ``|W|``):
    a sequence is taken as the concatenation of its flattened parts, without building it.
    Counts the values below a narrow band ``[hint - width, hint + width]`` around a guess (e.g.
    predicted from the previous step's threshold), and sorts only the values inside it. Without
    a guess, or when the band misses, the band is placed from a strided sample (sample ranks
    ``k·m/n`` ± a margin, widened on a miss); many tied values fall back to :func:`quantile`.
    Only the speed depends on ``hint`` and ``width`` (and ``scratch``: buffers reused across
    calls). Returns ``(quantile, density)``: the number of values per unit around the quantile
    (0.0 when unknown), to size the next band.

    >>> v = torch.rand(100_000)
    >>> tau, density = band_quantile(v, 0.9)
    >>> bool(tau == quantile(v, 0.9))
    True
    >>> bool(band_quantile(v, 0.9, hint=float(tau), width=100 / density)[0] == quantile(v, 0.9))
    True
    >>> bool(band_quantile([v[:30_000], v[30_000:]], 0.9)[0] == quantile(v, 0.9))
    True
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must be in [0, 1], got {q}")
    parts = _parts(values)
    n = sum(p.numel() for p in parts)
    if n <= _SAMPLE:
        return quantile(_cat(parts), q), 0.0
    if not _all_finite(parts):
        raise FloatingPointError("cannot threshold non-finite weights (NaN or inf): training diverged; "
                                 "lower the learning rate or check the loss")
    dtype = parts[0].dtype
    k, k_hi, frac = _ranks(n, q)
    scratch = scratch or _Scratch()
    scratch.get(max(p.numel() for p in parts), parts[0].device)  # sized once for the largest part

    def density(band):
        # values per unit around the quantile, from the band's own extremes (its bounds may be
        # infinite when the quantile sits at either end)
        span = float(band[-1]) - float(band[0])
        return (band.numel() - 1) / span if 0 < span < float("inf") else 0.0

    if hint is not None and width and width > 0 and hint == hint:
        lo = torch.tensor(hint - width, dtype=dtype, device=parts[0].device)
        hi = torch.tensor(hint + width, dtype=dtype, device=parts[0].device)
        out, band = _try_band(parts, k, k_hi, frac, lo, hi, scratch)
        if isinstance(out, torch.Tensor):
            return out, density(band)
    # place the band from a strided sample: ranks k/stride ± a margin of sampling error
    # at least 1/1024 of the values: the band's share of them falls as 1/sqrt(sample size), so on
    # 600 M weights a 65,536-value sample gives a band of ~10 M values, this one ~3 M
    stride = n // max(_SAMPLE, n >> 10)
    sample = torch.sort(_cat([p[::stride] for p in parts])).values
    m = sample.numel()
    # 4 standard deviations of a sample rank (binomial), so that one try almost always hits
    margin = int(4 * (m * q * (1 - q)) ** 0.5) + 16
    for _ in range(4):
        j_lo = max(0, (k * m) // n - margin)
        j_hi = min(m - 1, (k_hi * m) // n + margin)
        lo, hi = sample[j_lo], sample[j_hi]
        if j_lo == 0:
            lo = torch.tensor(-float("inf"), dtype=dtype, device=parts[0].device)
        if j_hi == m - 1:
            hi = torch.tensor(float("inf"), dtype=dtype, device=parts[0].device)
        out, band = _try_band(parts, k, k_hi, frac, lo, hi, scratch)
        if isinstance(out, torch.Tensor):
            return out, density(band)
        if isinstance(out, str):  # "wide"
            break
        margin *= 8
    return quantile(_cat(parts), q), 0.0


class QuantileTracker:
    """Stateful :func:`band_quantile` for a threshold recomputed every step (of one tensor, or of
    several taken together, e.g. every layer's ``|W|`` without concatenating them): the band is centred
    where the previous threshold and the local density predict the new one, about
    ``max(1024, n/8192)`` ranks wide on each side (plus half the rank shift asked for).

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
        self.scratch = _Scratch()

    def __call__(self, values, q: float) -> torch.Tensor:
        """The ``q`` quantile of ``values`` (a tensor, or a sequence of tensors taken together)."""
        n = values.numel() if isinstance(values, torch.Tensor) else sum(v.numel() for v in values)
        k = int((n - 1) * q)
        hint = width = None
        if self.last is not None and self.density > 0:
            shift = k - self.last_rank
            hint = self.last + shift / self.density
            width = (max(1024, n >> 13) + abs(shift) / 2) / self.density
        out, density = band_quantile(values, q, hint, width, self.scratch)
        self.last, self.last_rank = float(out), k
        self.density = density or self.density
        return out
