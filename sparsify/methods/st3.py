"""ST-3 and ST-3σ (Vanderschueren & De Vleeschouwer, WACV 2023; repo vanderschuea/stthree).

Global magnitude pruning whose forward soft-thresholds and rescales the kept weights, with a
straight-through backward (every latent weight, pruned or not, gets the gradient of its
effective weight). See docs/methods/st3.md.

Per layer (buffers): ``tau`` (τ_l; <= 0 means dense), ``mask`` (M = |W| > τ_l), ``scale``
(c per output channel) and ``fixed``. The group holds the global τ and recomputes everything
after every optimizer step until the fix step, where W ← W_eff and the forward becomes W ⊙ M.
Biases stay dense and unpruned (the official code removes them; torchvision models need them).

Speed (docs/performance.md): the group's update computes ``|W|``, the global τ (band search over
the layers' ``|W|`` without concatenating them), M, c and W_eff into per-layer scratch tensors
(``F.softshrink`` is ``(W − sign(W)·τ) ⊙ M`` when M = |W| > τ); the forward reuses that W_eff while
W, τ, M and c are unchanged (version counters), so the training step pays no effective-weight
arithmetic and the straight-through backward none either. Under torch.compile/export the forward
is the plain tensor formula, without Python scalars (no graph break).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.core.schedules import cubic
from sparsify.core.keep import (HeldLayers, DEFAULT_MIN_DENSITY, density_problems, guarded_thresholds, sigma_of,
                                 warn_empty, warn_short)
from sparsify.core.threshold import QuantileTracker
from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.params import Params, param
from sparsify.core.buffers import eager
from sparsify.core.layers import SparseWeightMixin, masked_weight, specialize, weight_base

__all__ = ["ST3Method", "ST3Mixin", "st3_effective_weight", "st3_scale", "sigma_of"]


class _StraightThrough(torch.autograd.Function):
    """Forward: the effective weight. Backward: the identity to the latent weight.

    ``setup_context`` and ``generate_vmap_rule``: torch.func's transforms (``grad``, ``vmap``:
    per-sample gradients) accept only functions written this way."""

    generate_vmap_rule = True

    @staticmethod
    def forward(latent, effective):
        return effective

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def st3_scale(weight: torch.Tensor, mask: torch.Tensor, magnitude: torch.Tensor | None = None,
              out_axis: int = 0) -> torch.Tensor:
    """Per-output-channel rescale ``c = 1.01 / (ρ + 0.01)`` with
    ``ρ = (mean|W|·M + 1e-6) / (mean|W| + 1e-6)`` over each output channel (the weight's
    dimension ``out_axis``: 1 for transformers' ``Conv1D``).

    >>> w = torch.tensor([[0.5, -0.05, 0.3, -0.4]])
    >>> st3_scale(w, w.abs() > 0.1)
    tensor([1.0412])
    """
    n = weight.shape[out_axis]
    a = (weight.detach().abs() if magnitude is None else magnitude).movedim(out_axis, 0).reshape(n, -1)
    m = mask.movedim(out_axis, 0).reshape(n, -1)
    rho = ((a * m).mean(1) + 1e-6) / (a.mean(1) + 1e-6)
    return 1.01 / (rho + 0.01)


def st3_effective_weight(weight: torch.Tensor, tau: float, mask: torch.Tensor,
                         scale: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """``W_eff = c · (W − sign(W)·τ) ⊙ M`` (no autograd tricks; see :class:`ST3Mixin`); ``c``
    runs along the weight's dimension ``out_axis``.

    >>> w = torch.tensor([[0.5, -0.05, 0.3, -0.4]])
    >>> m = w.abs() > 0.1
    >>> st3_effective_weight(w, 0.1, m, st3_scale(w, m))
    tensor([[ 0.4165,  0.0000,  0.2082, -0.3124]])
    """
    shape = [1] * weight.dim()
    shape[out_axis] = -1
    return scale.reshape(shape) * (weight - torch.sign(weight) * tau) * mask


class ST3Mixin(SparseWeightMixin):
    """Conv/Linear computing with the ST-3 effective weight; see the module docstring."""

    def init_sparse(self, **params) -> None:
        w = self.weight
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32, device=w.device))
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool))
        self.register_buffer("scale", torch.ones(w.shape[self.out_axis], dtype=w.dtype, device=w.device))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=w.device))
        self._baked = False  # W holds W_eff (the fix ran on this module's weights)

    def _sources(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.tau, self.mask, self.scale, self.fixed

    def effective_weight(self) -> torch.Tensor:
        if not eager():
            return self._traced_effective_weight()
        eff = self.cached("st3", *self._sources())  # W_eff written by set_threshold
        if eff is not None:
            return _StraightThrough.apply(self.weight, eff)
        if bool(self.fixed):
            return masked_weight(self, self.mask)
        tau = self._tau()
        if tau <= 0:
            return self.weight
        # W changed since the thresholds were set (M may no longer be |W| > τ): the definition
        eff = st3_effective_weight(self.weight.detach(), tau, self.mask, self.scale, self.out_axis)
        return _StraightThrough.apply(self.weight, eff)

    def _tau(self) -> float:
        """τ in the weight's dtype, the value ``|W| > τ`` compares with there: the mask, the
        ``softshrink`` of ``set_threshold`` and the formula of :func:`st3_effective_weight` then
        agree bit for bit (a bfloat16 layer's float32 τ would be rounded by the comparison but not by
        ``softshrink``: W_eff kept a few weights outside M, and a finalized copy, which recomputes
        W_eff by the formula, differed from the sparse model's output)."""
        return float(self.tau.to(self.weight.dtype))

    def _traced_effective_weight(self) -> torch.Tensor:
        """The same values and gradients from tensor ops only: no ``.item()``, no Python
        branch on buffers, so torch.compile traces one graph that serves every phase."""
        w = self.weight
        tau = self.tau.to(w.dtype)
        wd = w.detach()
        eff = self.scale.reshape(self.out_shape()) * (wd - torch.sign(wd) * tau) * self.mask
        live = torch.where(tau > 0, _StraightThrough.apply(w, eff), w)
        return torch.where(self.fixed, w * self.mask, live)

    @torch.no_grad()
    def set_threshold(self, tau: float, magnitude: torch.Tensor | None = None) -> None:
        """Recompute mask, scale and the effective weight from the current latent weight at
        threshold ``tau`` (``magnitude``: ``|W|`` if the caller has it already)."""
        if tau <= 0 and float(self.tau) <= 0:
            return  # dense already: the mask is all ones and the scale 1 (nothing to write)
        self.tau.fill_(tau)
        if tau <= 0:
            self.mask.fill_(True)
            self.scale.fill_(1.0)
            return
        w = self.weight
        if not eager():
            a = w.abs() if magnitude is None else magnitude
            torch.gt(a, tau, out=self.mask)
            self.scale.copy_(st3_scale(w, self.mask, a, self.out_axis))
            return
        if magnitude is None:
            magnitude = torch.abs(w, out=self.scratch("magnitude", w))
        t = self._tau()  # what the mask, the scale and W_eff all use
        eff = self.scratch("st3", w)
        # M = |W| > τ through a float 0/1 (a bool output is ~4x slower to write on CPU)
        self.mask.copy_(torch.gt(magnitude, t, out=eff))
        rows = (w.shape[0], -1)
        # c from the per-channel means of |W| ⊙ M (= threshold(|W|, τ, 0)) and of |W|
        # (a Conv1D's and a ConvTranspose's output channels are their weight's dimension 1)
        others = [d for d in range(w.dim()) if d != self.out_axis]
        per_out = (lambda a: a.view(rows).mean(1)) if self.out_axis == 0 else (lambda a: a.mean(others))
        kept = per_out(torch.threshold(magnitude, t, 0.0, out=eff))
        rho = (kept + 1e-6) / (per_out(magnitude) + 1e-6)
        self.scale.copy_(1.01 / (rho + 0.01))
        # (W − sign(W)·τ) ⊙ M with M = |W| > τ, in one pass; then c per output channel
        torch._C._nn.softshrink(w, t, out=eff)
        eff.mul_(self.scale.view(self.out_shape()))
        self.store_cached("st3", eff, *self._sources())

    @torch.no_grad()
    def fix(self) -> None:
        """Bake W ← W_eff and freeze the mask: from now on the forward is W ⊙ M. The group calls
        :meth:`set_threshold` first (the official order), so W_eff is that of the current W."""
        if bool(self.fixed):
            return
        self.weight.copy_(self.effective_weight().detach())
        self.mask &= self.weight != 0
        self.fixed.fill_(True)
        self._baked = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._baked = bool(self.fixed)  # a checkpoint saved after the fix holds baked weights

    def before_sync(self) -> bool:
        return getattr(self, "_baked", bool(self.fixed))

    @torch.no_grad()
    def after_sync(self, was_baked: bool, source=None) -> None:
        # The model baked W <- W_eff at its fix. An averaged copy that has not bakes its own W_eff
        # with the model's τ, scale and mask, the formula its forward used until now (so its
        # output does not jump); else it would average latent weights (larger by τ) into baked
        # ones and compute W ⊙ M on the mix. The tool's update at the fix step already mixed in
        # (1 - decay) of the model's baked W: that part is shrunk by τ once more, an error of
        # (1 - decay)·τ (0.001·τ at decay 0.999); a copy equal to the model (decay 0) is left as is.
        if was_baked or not bool(self.fixed) or float(self.tau) <= 0:
            return
        self._baked = True
        if source is not None and torch.equal(self.weight, source.weight.to(self.weight.device)):
            return
        self.weight.copy_(st3_effective_weight(self.weight, self._tau(), self.mask, self.scale, self.out_axis))

    @torch.no_grad()
    def averaged_lag(self) -> tuple[int, int] | None:
        # before the fix W_eff = c·(W − sign(W)·τ) ⊙ M with the model's M: an averaged weight the
        # model keeps but which lies at or below τ comes out with the opposite sign
        if bool(self.fixed) or float(self.tau) <= 0:
            return None
        return int((self.mask & (self.weight.abs() <= self._tau())).sum()), int(self.mask.sum())

    def sparse_repr(self) -> str:
        return f"tau={float(self.tau):.4g}, fixed={bool(self.fixed)}"


ST3_CLASSES = specialize(ST3Mixin, prefix="ST3")


class ST3Group(HeldLayers, Group):
    """All layers of one ST-3 rule: one global threshold, the cubic schedule, the fix step."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.begin, self.end = ctx.ramp(params, "st3")
        self.fix_at = ctx.time(params["fix"], "fix")
        self.register_buffer("tau", torch.zeros((), dtype=torch.float64))
        self.sigmas = {name: (sigma_of(m.weight) if params["sigma"] else 1.0) for name, m in members.items()}
        self._quantile = QuantileTracker()  # exact quantile, reusing the previous τ (speed only, not state)
        self._early_fix: str | None = None
        self._rest_quantile = QuantileTracker()  # the same over the layers not held at their floor
        self.floored: list[str] = []  # layers held at min_density by the last update
        self._warned: set[str] = set()

    def target(self, step: int) -> float:
        if self.fix_at is not None and step >= self.fix_at:
            return self.params["sparsity"]  # the fix forces the final ratio (also before the ramp's end)
        return cubic(step, self.begin, self.end, self.params["sparsity"])  # begin == end: a step

    def reads_weights(self, step: int) -> bool:
        fixing = self.fix_at is not None and step >= self.fix_at
        return not all(bool(m.fixed) for m in self.members.values()) and (fixing or self.target(step) > 0)

    def writes_weights(self, step: int) -> bool:
        fixing = self.fix_at is not None and step >= self.fix_at
        return fixing and not all(bool(m.fixed) for m in self.members.values())

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        layers = list(self.members.items())
        if all(bool(m.fixed) for _, m in layers):
            return  # frozen (also a loaded official checkpoint saved after its fix)
        fixing = self.fix_at is not None and step >= self.fix_at
        # the official order at the fix step: the ratio forced to its final value, τ, M and c
        # recomputed from the weights this step's optimizer update wrote, and only then W ← W_eff
        r = self.target(step)
        self._set_ratio(layers, r)
        if fixing:
            for _, m in layers:
                m.fix()
            if step < self.end:
                self._early_fix = (f"ST-3: fixed at step {step}, before the ramp's end (step {self.end}): the final "
                                   f"sparsity {r} was applied at the fix, as the official code does; put 'fix' "
                                   "after 'end' to reach it gradually")

    def warnings(self) -> list[str]:
        return [self._early_fix] if self._early_fix else []

    def _set_ratio(self, layers, r: float) -> None:
        """The global τ at ratio ``r`` over the layers' current weights, then each layer's M and c."""
        if r <= 0:
            self.tau.fill_(0.0)
            for _, m in layers:
                m.set_threshold(0.0)
            return
        # |W| once per layer and step, into scratch tensors when running eagerly
        live = eager()
        mags = {n: (torch.abs(m.weight, out=m.scratch("magnitude", m.weight)) if live else m.weight.abs())
                for n, m in layers}
        scaled = [self._scaled(m, mags[n], self.sigmas[n], live) for n, m in layers]
        # the official global τ, unless a layer would fall below min_density (docs/methods/st3.md)
        md = float(self.params["min_density"])
        taus, capped = guarded_thresholds(scaled, r, md, self._quantile, self._rest_quantile)
        self.floored = [layers[i][0] for i in capped]
        self.tau.fill_(float(taus[next((i for i in range(len(layers)) if i not in capped), 0)]))
        for (n, m), tau in zip(layers, taus):
            m.set_threshold(float(tau) * self.sigmas[n], mags[n])
        warn_empty("st3", {n: m.mask for n, m in layers}, self._warned, md)
        if r >= float(self.params["sparsity"]):  # the ramp's end
            warn_short("st3", {n: m.mask for n, m in layers}, r, self._warned)

    @staticmethod
    def _scaled(m: ST3Mixin, a: torch.Tensor, sigma: float, live: bool) -> torch.Tensor:
        """``|W| / σ`` in float32, the values the global quantile is taken over."""
        a = a.float()
        if sigma == 1.0:
            return a
        # the layer's W_eff scratch is free until set_threshold writes it
        return torch.div(a, sigma, out=m.scratch("st3", a)) if live else a / sigma

    def describe(self, step: int) -> dict:
        phase = ("dense" if step < self.begin else "ramp" if step < self.end else
                 "fixed" if self.fix_at is not None and step >= self.fix_at else "hold")
        out = {"phase": phase, "threshold": float(self.tau), "begin": self.begin, "end": self.end,
               "fix": self.fix_at}
        if self.floored:
            out["held_at_min_density"] = list(self.floored)
        return out


@dataclass
class ST3Params(Params):
    # the official code may fix before the ramp's end (the fix then applies the final ratio; a warning says so)
    time_order = (("begin", "end"), ("begin", "fix"))
    ramp_end = True
    sparsity: float = param(0.9, "Target fraction of zero weights, one global threshold over the rule's layers.",
                            ge=0, lt=1, what="a fraction in [0, 1)")
    begin: float = param(0, "Step where the cubic sparsity ramp starts.", time=True)
    end: float = param(0, "Step where the ramp reaches `sparsity` (begin == end: a single step).", time=True)
    fix: float | None = param(None, "Step from which W <- W_eff and the masks are frozen (null: never).", time=True)
    sigma: bool = param(False, "ST-3sigma: each layer's threshold scaled by 1/sqrt(sum of its weight's dimensions).")
    min_density: float = param(DEFAULT_MIN_DENSITY, "Share of each layer's weights always kept (0: no guard, "
                               "the official global threshold).", ge=0, lt=1,
                               what="a fraction in [0, 1) of each layer's weights kept (0: no guard, the official "
                                    "global threshold)")

    def check(self):
        return density_problems(self.sparsity, self.min_density)


@register
class ST3Method(Method):
    """Recipe method ``st3`` (docs/methods/st3.md); params (:class:`ST3Params`):

    * ``sparsity`` (0.9): target fraction of zero weights, one global threshold over the rule's layers;
    * ``begin`` (0), ``end`` (0): the cubic ramp's steps; ``fix`` (null): from this step W <- W_eff
      and the masks are frozen;
    * ``sigma`` (false): ST-3σ, each layer's threshold scaled by its σ = 1/sqrt(sum of weight dims);
    * ``min_density`` (0.01): share of each layer's weights always kept (docs/methods/st3.md,
      "Layer collapse and min_density"; 0: the official threshold).
    """

    name = "st3"
    own_forward = "run"  # its layer computes through SparseWeightMixin.forward_with
    description = "ST-3: global magnitude threshold, soft threshold + rescale, straight-through gradients"
    Params = ST3Params
    group_class = ST3Group

    def out_channel_state(self, params: dict) -> bool:
        return True  # the scale c

    def apply(self, site, params) -> None:
        site.replace(ST3_CLASSES[weight_base(site.module)].from_dense(site.module))
