"""Comparing model outputs: tensors or nested dicts/lists/tuples of them."""
from __future__ import annotations

import torch

__all__ = ["flatten_tensors", "outputs_close"]


def flatten_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or dicts/lists/tuples of them), in order.

    >>> len(flatten_tensors({"a": torch.zeros(1), "b": [torch.zeros(2), None]}))
    2
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_tensors(v)]
    return []


def outputs_close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[bool, float]:
    """Whether two model outputs (tensors or nested containers) agree; also the largest
    difference relative to the largest magnitude of ``a``."""
    fa, fb = flatten_tensors(a), flatten_tensors(b)
    if len(fa) != len(fb):
        return False, float("inf")
    worst = 0.0
    ok = True
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            return False, float("inf")
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        worst = max(worst, diff / (scale or 1.0))
        ok = ok and bool(torch.allclose(x.float(), y.float(), rtol=rtol, atol=atol * max(scale, 1.0)))
    return ok, worst
