"""N:M masks: which ``n`` of every ``m`` consecutive input channels a weight keeps (the largest
``|W|``, ties: the lower channel), computed exactly and without sorting in a planes layout that
a layer also keeps to rewrite only the flags that changed; and the compliance check."""
from __future__ import annotations

import torch

from sparsify.core.buffers import workspace

__all__ = ["nm_mask", "nm_compliant"]


def _grouped(t: torch.Tensor, m: int) -> torch.Tensor:
    """``(…, M)`` view of a weight with input channels last (a copy for convs)."""
    return t.movedim(1, -1).reshape(-1, m)


def _keep_planes(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, int, int]:
    """The N:M keep flags of ``weight`` in planes layout: ``flat[:N]`` viewed ``(m, rows, k)``
    holds member ``j`` of every group (``rows`` groups of ``k`` kernel positions) in plane ``j``.

    ``flat`` is a thread-shared uint8 scratch tensor of ``N`` rounded up to 8 bytes, its tail
    zeroed (so it can be compared 8 bytes at a time). Member ``j`` is kept when fewer than ``n``
    members beat it: later members win only by a larger ``|W|``, so ties keep the lower channel.
    ``m(m−1)/2`` comparisons of contiguous planes, no sort.
    """
    w = weight.detach()
    cout, cin = w.shape[0], w.shape[1]
    if cin % m:
        raise ValueError(f"nm_mask: {cin} input channels are not a multiple of m={m}")
    k = w[0, 0].numel()  # kernel positions
    rows = cout * (cin // m)
    size = rows * k
    planes = workspace((m, rows, k), w.dtype, w.device)
    torch.abs(w.reshape(rows, m, k).transpose(0, 1), out=planes)
    planes = planes.view(m, size)
    # rank[j] = (members beating member j) − n, kept iff negative. The earlier members win
    # ties, so it starts at j − n, and each comparison with a later member i moves it (i beats
    # j iff |W_i| > |W_j|). int8 planes: the additions and the sign test are ~10x cheaper than
    # on floats or against a Python scalar.
    rank_dtype = torch.int8 if m <= 60 else torch.int32
    rank = workspace((m, size), rank_dtype, w.device)
    for j in range(m):
        rank[j].fill_(j - n)
    beats = workspace((size,), torch.bool, w.device)
    for j in range(m):
        for i in range(j + 1, m):
            torch.lt(planes[j], planes[i], out=beats)
            b = beats.view(torch.int8) if rank_dtype == torch.int8 else beats.to(rank_dtype)
            rank[j].add_(b)
            rank[i].sub_(b)
    total = m * size
    flat = workspace((-(-total // 8) * 8,), torch.uint8, w.device)
    flat[total:].zero_()
    torch.signbit(rank, out=flat[:total].view(torch.bool).view(m, size))
    return flat, rows, k


def _to_weight_layout(flat: torch.Tensor, out: torch.Tensor, m: int, rows: int, k: int) -> None:
    """Write planes-layout keep flags into a contiguous bool tensor in the weight's layout."""
    out.view(torch.uint8).view(rows, m, k).copy_(flat[:out.numel()].view(m, rows, k).transpose(0, 1))


def nm_mask(weight: torch.Tensor, n: int, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` largest ``|W|`` of every ``m`` consecutive input channels (ties: the
    lower channel), as a bool tensor shaped like ``weight`` (written into ``out`` if given).

    Exact and sort-free (``m(m−1)/2`` comparisons of contiguous planes of ``|W|``).

    >>> nm_mask(torch.tensor([[0.1, -0.9, 0.5, 0.2, 1.0, 0.0, 0.0, -2.0]]), 2, 4).int()
    tensor([[0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.int32)
    """
    with torch.no_grad():
        flat, rows, k = _keep_planes(weight, n, m)
        if out is None:
            out = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        target = out if out.is_contiguous() and out.dtype == torch.bool else torch.empty(
            weight.shape, dtype=torch.bool, device=weight.device)
        _to_weight_layout(flat, target, m, rows, k)
        if target is not out:
            out.copy_(target)
    return out


def _changed(flat: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Indices where two equally long uint8 tensors (length a multiple of 8) differ: compared
    8 bytes at a time, then byte by byte inside the words that differ (a few per step)."""
    words = torch.bitwise_xor(flat.view(torch.int64), prev.view(torch.int64),
                              out=workspace((flat.numel() // 8,), torch.int64, flat.device))
    at = words.nonzero().view(-1)
    if at.numel() == 0:
        return at
    row, col = (flat.view(-1, 8)[at] != prev.view(-1, 8)[at]).nonzero().unbind(1)
    return at[row] * 8 + col


def nm_compliant(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` input channels holds at most ``n`` non-zeros.

    >>> nm_compliant(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
    True
    """
    return bool((_grouped(weight != 0, m).sum(1) <= n).all())
