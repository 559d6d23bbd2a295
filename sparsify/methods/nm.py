"""N:M weight sparsity: N non-zeros kept in every M consecutive input channels (2:4, 1:4, ...).

Groups run along the input dimension the way sparse tensor cores consume them (NVIDIA ASP):
for a conv weight ``(Cout, Cin/groups, kh, kw)``, each group is M consecutive input channels at
a fixed ``(out, kh, kw)``; for a Linear, M consecutive input features. The N largest ``|W|`` of
each group are kept (ties: the lower index).

Training is straight-through (Zhou et al., ICLR 2021): the forward computes with ``W ⊙ M``, the
backward passes the gradient to every latent weight (pruned ones included), and the mask is
recomputed from ``|W|`` after every optimizer step from ``begin`` on. ``decay`` > 0 adds SR-STE's
``decay · (1 − M) ⊙ W`` to the gradient of pruned weights. From ``fix`` on the mask is frozen
and pruned weights get zero gradient. Layers whose input channels are not a multiple of M
(depthwise convs, an RGB stem) stay dense; ``plan`` says why. ``report`` checks every layer:
``nm_compliant`` per layer and for the group.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Group, GroupContext, Method, SparseWeightMixin, specialize, weight_base

__all__ = ["NMMethod", "NMMixin", "nm_mask", "nm_compliant"]


def _grouped(t: torch.Tensor, m: int) -> torch.Tensor:
    """``(…, M)`` view of a weight with input channels last (a copy for convs)."""
    return t.movedim(1, -1).reshape(-1, m)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|W|`` of every ``m`` consecutive input channels.

    >>> nm_mask(torch.tensor([[0.1, -0.9, 0.5, 0.2, 1.0, 0.0, 0.0, -2.0]]), 2, 4).int()
    tensor([[0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.int32)
    """
    a = _grouped(weight.detach().abs(), m)
    # stable descending sort: equal magnitudes keep the lower index (topk's choice is unspecified)
    idx = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)
    moved = weight.movedim(1, -1).shape
    return keep.reshape(moved).movedim(-1, 1)


def nm_compliant(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` input channels holds at most ``n`` non-zeros.

    >>> nm_compliant(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
    True
    """
    return bool((_grouped(weight != 0, m).sum(1) <= n).all())


class _MaskedStraightThrough(torch.autograd.Function):
    """Forward ``W ⊙ M``; backward: the gradient to every W, plus ``decay·(1−M)⊙W`` (SR-STE)."""

    @staticmethod
    def forward(ctx, weight, mask, decay: float):
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        if ctx.decay:
            weight, mask = ctx.saved_tensors
            grad = grad + ctx.decay * weight * ~mask
        return grad, None, None


class NMMixin(SparseWeightMixin):
    """Conv/Linear computing with ``W ⊙ M`` (N:M mask set by the group)."""

    def init_sparse(self, n: int = 2, m: int = 4, decay: float = 0.0, **_) -> None:
        self.nm = (int(n), int(m))
        self.sr_ste_decay = float(decay)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=self.weight.device))

    def effective_weight(self) -> torch.Tensor:
        if bool(self.fixed):
            return self.weight * self.mask
        return _MaskedStraightThrough.apply(self.weight, self.mask, self.sr_ste_decay)

    def sparse_repr(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}, fixed={bool(self.fixed)}"


NM_CLASSES = specialize(NMMixin, prefix="NM")


class NMGroup(Group):
    """The layers of one N:M rule: masks recomputed each step from ``begin`` until ``fix``."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.n, self.m = int(params["n"]), int(params["m"])
        self.begin = ctx.time(params["begin"], "begin")
        self.fix_at = ctx.time(params["fix"], "fix")
        if self.fix_at is not None and self.fix_at < self.begin:
            raise ValueError(f"nm: fix ({self.fix_at}) is before begin ({self.begin})")

    def target(self, step: int) -> float:
        return 1.0 - self.n / self.m if step >= self.begin else 0.0

    def final_target(self) -> float:
        return 1.0 - self.n / self.m

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        for m in self.members.values():
            if bool(m.fixed):
                continue
            if step < self.begin:
                m.mask.fill_(True)
                continue
            m.mask.copy_(nm_mask(m.weight, self.n, self.m))
            if self.fix_at is not None and step >= self.fix_at:
                m.fixed.fill_(True)

    def _compliance(self) -> dict[str, bool]:
        return {n: nm_compliant(m.deployed_weight(), self.n, self.m) for n, m in self.members.items()}

    def describe(self, step: int) -> dict:
        phase = ("dense" if step < self.begin else
                 "fixed" if self.fix_at is not None and step >= self.fix_at else "straight-through")
        return {"phase": phase, "nm": f"{self.n}:{self.m}", "nm_compliant": all(self._compliance().values()),
                "begin": self.begin, "fix": self.fix_at}

    def layer_stats(self, name: str, module: nn.Module) -> dict:
        return {"nm": f"{self.n}:{self.m}", "nm_compliant": nm_compliant(module.deployed_weight(), self.n, self.m)}


class NMMethod(Method):
    name = "nm"
    description = "N:M weight sparsity (N kept in every M input channels), straight-through training"
    params = {"n": 2, "m": 4, "begin": 0, "fix": None, "decay": 0.0}
    schedule_keys = ("begin", "fix")
    group_class = NMGroup

    def check(self, params):
        problems = super().check(params)
        n, m = params.get("n"), params.get("m")
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (n, m))
        if not ok or not (1 <= n < m):
            problems.append(("n", f"n and m must be whole numbers with 1 <= n < m, got n={n!r}, m={m!r}"))
        d = params.get("decay")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or d < 0:
            problems.append(("decay", f"must be a number >= 0 (SR-STE uses 2e-4), got {d!r}"))
        return problems

    def accepts(self, site):
        why = super().accepts(site)
        if why:
            return why
        m = int((site.params or {}).get("m", self.params["m"]))
        cin = site.module.weight.shape[1]
        if cin % m:
            return (f"N:M groups run along the input channels: {cin} input channel(s) per group is not a "
                    f"multiple of {m} (depthwise convs and RGB stems stay dense, as with NVIDIA ASP)")
        return None

    def apply(self, site, params) -> None:
        site.replace(NM_CLASSES[weight_base(site.module)].from_dense(
            site.module, n=params["n"], m=params["m"], decay=params["decay"]))
