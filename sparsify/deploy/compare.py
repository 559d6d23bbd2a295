"""Comparing model outputs: tensors or nested dicts/lists/tuples of them."""
from __future__ import annotations

import torch

__all__ = ["flatten_tensors", "outputs_close", "answered_alike", "rolled", "same_outputs"]


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
    difference relative to the largest magnitude of ``a``. Boolean tensors (a padding mask passed
    on to a layer) are compared as 0/1.

    >>> outputs_close([torch.ones(2), torch.tensor([True])], [torch.ones(2), torch.tensor([False])])
    (False, 1.0)

    NaN and infinities agree where both sides hold the same (a masked logit's -inf); the scale is
    that of the finite values:

    >>> inf, nan = float("inf"), float("nan")
    >>> outputs_close(torch.tensor([1.0, -inf, nan]), torch.tensor([1.0, -inf, nan]))
    (True, 0.0)
    >>> outputs_close(torch.tensor([1.0, -inf]), torch.tensor([1.0, 3.0]))
    (False, inf)
    """
    fa, fb = flatten_tensors(a), flatten_tensors(b)
    if len(fa) != len(fb):
        return False, float("inf")
    worst = 0.0
    ok = True
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            return False, float("inf")
        x, y = x.float(), y.float()
        finite = torch.isfinite(x) & torch.isfinite(y)
        scale = float(x[finite].abs().max()) if bool(finite.any()) else 0.0
        diff = float((x[finite] - y[finite]).abs().max()) if bool(finite.any()) else 0.0
        same = bool(torch.allclose(x, y, rtol=rtol, atol=atol * max(scale, 1.0), equal_nan=True))
        worst = max(worst, diff / (scale or 1.0) if bool(finite.all()) or same else float("inf"))
        ok = ok and same
    return ok, worst


def answered_alike(inputs, output) -> int:
    """How many example samples a model answered with one and the same output although they
    differ: the batch size when every floating batch-first output is equal along the batch and
    some input is not, else 0 (also when one sample cannot show it).

    >>> x = (torch.tensor([[1.0], [2.0]]),)
    >>> answered_alike(x, torch.ones(2, 3)), answered_alike(x, x[0] * 2)
    (2, 0)
    """
    xs = [t for t in flatten_tensors(inputs) if t.dim() >= 1]
    n = xs[0].shape[0] if xs else 0
    if n < 2 or not any(t.shape[0] == n and not bool((t == t[:1]).all()) for t in xs):
        return 0
    outs = [t for t in flatten_tensors(output) if t.dim() >= 1 and t.shape[0] == n and t.is_floating_point()]
    return n if outs and all(bool((t == t[:1]).all()) for t in outs) else 0


def rolled(inputs: tuple) -> tuple | None:
    """``inputs`` with every tensor rolled by one along its last dimension: another input of the
    same values (valid token ids stay valid), or None when that changes none of them.

    >>> rolled((torch.tensor([[1, 2, 3]]),)), rolled((torch.ones(1, 3),))
    ((tensor([[3, 1, 2]]),), None)
    """
    out = tuple(t.roll(1, -1) if isinstance(t, torch.Tensor) and t.dim() else t for t in inputs)
    changed = any(isinstance(a, torch.Tensor) and a.dim() and not torch.equal(a, b) for a, b in zip(inputs, out))
    return out if changed else None


def same_outputs(a, b) -> bool:
    """Whether two outputs are exactly equal in every floating tensor (and have some).

    >>> same_outputs(torch.ones(2), torch.ones(2)), same_outputs(torch.ones(2), torch.zeros(2))
    (True, False)
    """
    fa = [t for t in flatten_tensors(a) if t.is_floating_point()]
    fb = [t for t in flatten_tensors(b) if t.is_floating_point()]
    return bool(fa) and len(fa) == len(fb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(fa, fb))
