"""The example inputs a sparsified model keeps (for finalize's check and the MAC counts), moved,
cast and materialized as the model is: ``SparsifyState._apply`` runs these on every ``.to()``,
``.half()`` or ``to_empty()``. Apart from the state because they only walk a pytree of tensors.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

__all__: list[str] = []  # private helpers of sparsify.core.state


def _moved_like(value, fn):
    """``value`` (a tensor, or a pytree of them: tuples, lists, dicts) with each tensor moved and
    cast as ``fn`` (the function ``Module._apply`` got from ``.to()``, ``.cuda()``, ``.half()``...)
    moves and casts a tensor of its dtype and device; values kept (``fn`` itself may make empty
    tensors: ``to_empty``). A tensor that ``fn`` does not turn into a plain tensor stays as it is.

    >>> half = lambda t: t.half() if t.is_floating_point() else t
    >>> x, rest = _moved_like((torch.ones(2), {"ids": torch.ones(2, dtype=torch.int64)}), half)
    >>> x.dtype, rest["ids"].dtype
    (torch.float16, torch.int64)
    """
    seen: dict = {}

    def move(v):
        if not isinstance(v, torch.Tensor) or v.is_meta:
            return v
        key = (v.dtype, v.device)
        if key not in seen:
            try:
                probe = fn(torch.zeros((), dtype=v.dtype, device=v.device))
            except Exception:  # a function meant for parameters only: the inputs stay
                probe = None
            seen[key] = (probe.device, probe.dtype) if type(probe) is torch.Tensor and not probe.is_meta else None
        return v if seen[key] is None else v.to(device=seen[key][0], dtype=seen[key][1])

    return pytree.tree_map(move, value)


def _off_meta(value, device: torch.device):
    """``value`` (a pytree, as for :func:`_moved_like`) with its meta tensors as tensors of the
    same shape on ``device``: floating ones drawn from a fixed seed (finalize's check compares
    outputs on them), the others zero."""
    def materialize(v):
        if not (isinstance(v, torch.Tensor) and v.is_meta):
            return v
        if v.is_floating_point():
            return torch.randn(v.shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=v.dtype)
        return torch.zeros(v.shape, dtype=v.dtype, device=device)

    return pytree.tree_map(materialize, value)
