"""ST-3 and ST-3σ (Vanderschueren & De Vleeschouwer, WACV 2023; repo vanderschuea/stthree).

Global magnitude pruning whose forward soft-thresholds and rescales the kept weights, with a
straight-through backward (every latent weight, pruned or not, gets the gradient of its
effective weight). See METHODS.md §1 and docs/methods/st3.md.

Per layer (buffers): ``tau`` (τ_l; <= 0 means dense), ``mask`` (M = |W| > τ_l), ``scale``
(c per output channel) and ``fixed``. The group holds the global τ and recomputes everything
after every optimizer step until the fix step, where W ← W_eff and the forward becomes W ⊙ M.
Biases stay dense and unpruned (the official code removes them; torchvision models need them).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..schedules import cubic
from ..threshold import QuantileTracker
from .base import Group, GroupContext, Method, SparseWeightMixin, specialize, weight_base

__all__ = ["ST3Method", "ST3Mixin", "st3_effective_weight", "st3_scale", "sigma_of"]


class _StraightThrough(torch.autograd.Function):
    """Forward: the effective weight. Backward: the identity to the latent weight."""

    @staticmethod
    def forward(ctx, latent, effective):
        return effective

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def st3_scale(weight: torch.Tensor, mask: torch.Tensor, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel rescale ``c = 1.01 / (ρ + 0.01)`` with
    ``ρ = (mean|W|·M + 1e-6) / (mean|W| + 1e-6)`` over each output channel.

    >>> w = torch.tensor([[0.5, -0.05, 0.3, -0.4]])
    >>> st3_scale(w, w.abs() > 0.1)
    tensor([1.0412])
    """
    a = (weight.detach().abs() if magnitude is None else magnitude).reshape(weight.shape[0], -1)
    m = mask.reshape(weight.shape[0], -1)
    rho = ((a * m).mean(1) + 1e-6) / (a.mean(1) + 1e-6)
    return 1.01 / (rho + 0.01)


def st3_effective_weight(weight: torch.Tensor, tau: float, mask: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """``W_eff = c · (W − sign(W)·τ) ⊙ M`` (no autograd tricks; see :class:`ST3Mixin`).

    >>> w = torch.tensor([[0.5, -0.05, 0.3, -0.4]])
    >>> m = w.abs() > 0.1
    >>> st3_effective_weight(w, 0.1, m, st3_scale(w, m))
    tensor([[ 0.4165,  0.0000,  0.2082, -0.3124]])
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return scale.reshape(shape) * (weight - torch.sign(weight) * tau) * mask


def sigma_of(weight: torch.Tensor) -> float:
    """ST-3σ's layer scale ``σ = 1 / sqrt(sum of the weight's dimensions)`` (e.g. Cout+Cin+kh+kw).

    >>> sigma_of(torch.zeros(64, 32, 3, 3))  # 1 / sqrt(64 + 32 + 3 + 3)
    0.09901475429766744
    """
    return 1.0 / math.sqrt(sum(weight.shape))


class ST3Mixin(SparseWeightMixin):
    """Conv/Linear computing with the ST-3 effective weight; see the module docstring."""

    def init_sparse(self, **params) -> None:
        w = self.weight
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32, device=w.device))
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool))
        self.register_buffer("scale", torch.ones(w.shape[0], dtype=w.dtype, device=w.device))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=w.device))

    def effective_weight(self) -> torch.Tensor:
        if bool(self.fixed):
            return self.weight * self.mask
        tau = float(self.tau)
        if tau <= 0:
            return self.weight
        eff = st3_effective_weight(self.weight.detach(), tau, self.mask, self.scale)
        return _StraightThrough.apply(self.weight, eff)

    @torch.no_grad()
    def set_threshold(self, tau: float, magnitude: torch.Tensor | None = None) -> None:
        """Recompute mask and scale from the current latent weight at threshold ``tau``
        (``magnitude``: ``|W|`` if the caller has it already)."""
        if tau <= 0 and float(self.tau) <= 0:
            return  # dense already: the mask is all ones and the scale 1 (nothing to write)
        self.tau.fill_(tau)
        if tau <= 0:
            self.mask.fill_(True)
            self.scale.fill_(1.0)
            return
        a = self.weight.abs() if magnitude is None else magnitude
        torch.gt(a, tau, out=self.mask)
        self.scale.copy_(st3_scale(self.weight, self.mask, a))

    @torch.no_grad()
    def fix(self) -> None:
        """Bake W ← W_eff and freeze the mask: from now on the forward is W ⊙ M."""
        if bool(self.fixed):
            return
        self.weight.copy_(self.effective_weight().detach())
        self.mask &= self.weight != 0
        self.fixed.fill_(True)

    def sparse_repr(self) -> str:
        return f"tau={float(self.tau):.4g}, fixed={bool(self.fixed)}"


ST3_CLASSES = specialize(ST3Mixin, prefix="ST3")


class ST3Group(Group):
    """All layers of one ST-3 rule: one global threshold, the cubic schedule, the fix step."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.begin, self.end = ctx.ramp(params, "st3")
        self.fix_at = ctx.time(params["fix"], "fix")
        self.register_buffer("tau", torch.zeros((), dtype=torch.float64))
        self.sigmas = {name: (sigma_of(m.weight) if params["sigma"] else 1.0) for name, m in members.items()}
        self._quantile = QuantileTracker()  # exact quantile, reusing the previous τ (speed only, not state)

    def target(self, step: int) -> float:
        return cubic(step, self.begin, self.end, self.params["sparsity"])  # begin == end: a step

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        layers = list(self.members.items())
        if self.fix_at is not None and step >= self.fix_at:
            for _, m in layers:
                m.fix()
            return
        r = self.target(step)
        if r <= 0:
            self.tau.fill_(0.0)
            for _, m in layers:
                m.set_threshold(0.0)
            return
        mags = {n: m.weight.detach().abs() for n, m in layers}  # |W| once per layer and step
        scaled = torch.cat([(a.float() if self.sigmas[n] == 1.0 else a.float() / self.sigmas[n]).reshape(-1)
                            for n, a in mags.items()])
        tau = float(self._quantile(scaled, r))
        self.tau.fill_(tau)
        for n, m in layers:
            m.set_threshold(tau * self.sigmas[n], mags[n])

    def describe(self, step: int) -> dict:
        phase = ("dense" if step < self.begin else "ramp" if step < self.end else
                 "fixed" if self.fix_at is not None and step >= self.fix_at else "hold")
        return {"phase": phase, "threshold": float(self.tau), "begin": self.begin, "end": self.end,
                "fix": self.fix_at}


class ST3Method(Method):
    name = "st3"
    description = "ST-3: global magnitude threshold, soft threshold + rescale, straight-through gradients"
    params = {"sparsity": 0.9, "begin": 0, "end": 0, "fix": None, "sigma": False}
    schedule_keys = ("begin", "end", "fix")
    group_class = ST3Group

    def check(self, params):
        problems = super().check(params)
        if params.get("sparsity") is None:
            problems.append(("sparsity", "must be a fraction in [0, 1), got None"))
        if not isinstance(params.get("sigma"), bool):
            problems.append(("sigma", "must be true or false"))
        return problems

    def apply(self, site, params) -> None:
        site.replace(ST3_CLASSES[weight_base(site.module)].from_dense(site.module))
