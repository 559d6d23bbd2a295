"""The N:M method: its group (masks recomputed each step from ``begin`` until ``fix``; compliance
in ``report``) and the recipe method ``nm``, which leaves layers whose input channels are not a
multiple of ``m`` dense."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.params import Params, param
from sparsify.core.layers import weight_base
from sparsify.core.conv1d import torch_layout
from sparsify.methods.nm.mask import nm_compliant
from sparsify.methods.nm.layer import NM_CLASSES

__all__ = ["NMGroup", "NMParams", "NMMethod"]


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

    def reads_weights(self, step: int) -> bool:
        return step >= self.begin and not all(bool(m.fixed) for m in self.members.values())

    def writes_weights(self, step: int) -> bool:
        return False  # its update writes masks, never the weights

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        for m in self.members.values():
            if bool(m.fixed):
                continue
            if step < self.begin:
                m.mask.fill_(True)
                continue
            m.recompute_mask(self.n, self.m)
            if self.fix_at is not None and step >= self.fix_at:
                m.fixed.fill_(True)

    def _compliance(self) -> dict[str, bool]:
        return {n: nm_compliant(torch_layout(m, m.deployed_weight()), self.n, self.m) for n, m in self.members.items()}

    def describe(self, step: int) -> dict:
        phase = ("dense" if step < self.begin else
                 "fixed" if self.fix_at is not None and step >= self.fix_at else "straight-through")
        return {"phase": phase, "nm": f"{self.n}:{self.m}", "nm_compliant": all(self._compliance().values()),
                "begin": self.begin, "fix": self.fix_at}

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        return {"nm": f"{self.n}:{self.m}",
                "nm_compliant": nm_compliant(torch_layout(module, module.deployed_weight()), self.n, self.m)}


@dataclass
class NMParams(Params):
    n: int = param(2, "Weights kept in every group of m (along the input channels).", ge=1)
    m: int = param(4, "Group size along the input channels.", ge=2)
    begin: float = param(0, "Step from which the N:M masks apply.", time=True)
    fix: float | None = param(None, "Step from which the masks are frozen (null: never).", time=True)
    decay: float = param(0.0, "SR-STE decay of the pruned weights.", ge=0, what="a number >= 0 (SR-STE uses 2e-4)")

    def check(self):
        ok = self.n < self.m
        return [] if ok else [("n", f"n and m must be whole numbers with 1 <= n < m, got n={self.n!r}, m={self.m!r}")]


@register
class NMMethod(Method):
    """Recipe method ``nm`` (docs/methods/nm.md); params (:class:`NMParams`): ``n`` (2) of every
    ``m`` (4) weights kept along the input channels; ``begin`` (0): first masked step; ``fix``
    (null): masks frozen from this step; ``decay`` (0): SR-STE's decay of the pruned weights."""

    name = "nm"
    own_forward = "run"  # its layer computes through SparseWeightMixin.forward_with
    description = "N:M weight sparsity (N kept in every M input channels), straight-through training"
    Params = NMParams
    group_class = NMGroup

    def out_channel_state(self, params: dict) -> bool:
        return True  # groups read in the (out, in, ...) layout

    def accepts(self, site):
        why = super().accepts(site)
        if why:
            return why
        m = int((site.params or {}).get("m", self.params["m"]))
        cin = torch_layout(site.module, site.module.weight).shape[1]
        if cin % m:
            return (f"N:M groups run along the input channels: {cin} input channel(s) per group is not a "
                    f"multiple of {m} (depthwise convs and RGB stems stay dense, as with NVIDIA ASP)")
        return None

    def apply(self, site, params) -> None:
        site.replace(NM_CLASSES[weight_base(site.module)].from_dense(
            site.module, n=params["n"], m=params["m"], decay=params["decay"]))
