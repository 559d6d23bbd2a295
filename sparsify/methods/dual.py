"""Weight ℓ1 + threshold pruning with fixed masks: stage 2 of dual sparse training (Yu & Tian 2024).

Method ``l1-prune``: from ``begin`` (or its recipe stage's begin) every selected Conv/Linear adds
``l1 · Σ|W|`` to ``sparsify.penalty`` (recorded in training-mode forwards, float32); at the prune
step (``prune_at``, a fraction of the stage) the weights at or below one global magnitude
threshold are pruned (``sparsity``: the fraction pruned, by exact quantile; or ``threshold``: an
absolute value), the ℓ1 term stops and the masks are fixed for good: the forward computes with
``W ⊙ M`` (pruned weights get zero gradient), through every later stage. The recipe ``dual``
stages it with Transformed-ℓ1 on activations (``regularizers.py``). See docs/methods/dual.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.core.extra_state import WIDEST_FLOAT, pack, unpack
from sparsify.core.keep import HeldLayers, DEFAULT_MIN_DENSITY, density_problems, guarded_thresholds, sigma_of, warn_empty
from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.forwards import entered
from sparsify.core.params import Params, param
from sparsify.core.layers import SparseWeightMixin, specialize, weight_base
from sparsify.core.records import RecordsGroupMixin, RecordsMixin
from sparsify.core.sharded import check_gathered
from sparsify.core.staging import active_range, in_range, resolve_stages, stage_at

__all__ = ["L1PruneMixin", "L1PruneGroup", "L1PruneMethod"]


class L1PruneMixin(RecordsMixin, SparseWeightMixin):
    """Conv/Linear with a fixed-after-pruning mask and an optional recorded ℓ1 term."""

    def init_sparse(self, **params) -> None:
        w = self.weight
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=w.device))
        self.l1 = 0.0  # λ of the ℓ1 term while it is on, else 0 (kept in state_dict via extra state)
        self._fixed = False  # python mirror of ``fixed``: no device sync in forward
        self.records: list[torch.Tensor] = []

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask if self._fixed else self.weight

    def forward(self, x, output_size=None):
        entered(self, x)
        check_gathered(self, self.weight)
        if self.l1 and self.recording():
            self.record(self.l1 * self.weight.float().abs().sum())
        return self.forward_saving(x, self.effective_weight, output_size)

    @torch.no_grad()
    def prune(self, tau: float) -> None:
        """Fix the mask ``|W| > tau`` and zero the pruned latent weights."""
        torch.gt(self.weight.abs(), tau, out=self.mask)
        self.weight.mul_(self.mask)
        self.fixed.fill_(True)
        self._fixed = True

    def get_extra_state(self):
        return pack({"l1": self.l1}, like={"l1": WIDEST_FLOAT})

    def set_extra_state(self, state) -> None:
        self.l1 = float(unpack(state).get("l1", 0.0))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._fixed = bool(self.fixed)

    def sparse_repr(self) -> str:
        return f"l1={self.l1:g}, fixed={self._fixed}"


L1PRUNE_CLASSES = specialize(L1PruneMixin, prefix="L1Prune")


class L1PruneGroup(HeldLayers, RecordsGroupMixin, Group):
    """All layers of one ``l1-prune`` rule: ℓ1 on, then one global threshold, then fixed masks."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.begin, self.end = active_range(params, ctx, method.name)
        frac = float(params["prune_at"])
        if self.end is None:
            self.prune_step = self.begin if frac == 0 else None
            if self.prune_step is None:
                raise ValueError("l1-prune: an open-ended stage needs prune_at = 0 (prune at its begin) "
                                 "or an end step")
        else:
            self.prune_step = self.begin + int(round(frac * (self.end - self.begin)))
        self._stages = resolve_stages(ctx)  # plain data: a group keeps no reference to the model
        self.register_buffer("tau", torch.zeros((), dtype=torch.float64))
        self._init_records()
        self.floored: list[str] = []  # layers held at min_density by the prune step
        self.sigmas = [sigma_of(m.weight) if params["sigma"] else 1.0 for m in members.values()]

    def reads_weights(self, step: int) -> bool:
        return step >= self.prune_step and not any(m._fixed for m in self.members.values())

    def writes_weights(self, step: int) -> bool:
        return self.reads_weights(step)  # the prune step zeroes the pruned latent weights

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        layers = list(self.members.values())
        if step >= self.prune_step:
            if not any(m._fixed for m in layers):
                taus = self._thresholds(layers)
                self.tau.fill_(max(taus))
                for m, tau in zip(layers, taus):
                    m.prune(tau)
                warn_empty("l1-prune", {n: m.mask for n, m in self.members.items()}, set(),
                           float(self.params["min_density"]), self.params["threshold"])
            for m in layers:
                m.l1 = 0.0
            return
        on = in_range(step, self.begin, self.end)
        for m in layers:
            m.l1 = float(self.params["l1"]) if on else 0.0

    def _thresholds(self, layers) -> list[float]:
        """One global threshold over ``|W| / σ`` (σ = 1 without ``sigma``), applied as ``τ·σ``, except
        for layers it would push below min_density (their own)."""
        if self.params["threshold"] is not None:
            return [float(self.params["threshold"])] * len(layers)
        if float(self.params["sparsity"]) <= 0:  # nothing pruned, as st3 / magnitude at 0 (the quantile's
            return [-1.0] * len(layers)          # count, floor((N-1)r)+1, would still take one weight)
        mags = [m.weight.detach().abs().float().reshape(-1) / s for m, s in zip(layers, self.sigmas)]
        taus, capped = guarded_thresholds(mags, float(self.params["sparsity"]), float(self.params["min_density"]))
        names = list(self.members)
        self.floored = [names[i] for i in capped]
        return [float(t) * s for t, s in zip(taus, self.sigmas)]

    def target(self, step: int):
        if self.params["threshold"] is not None:
            return None
        return float(self.params["sparsity"]) if step >= self.prune_step else 0.0

    def final_target(self):
        return None if self.params["threshold"] is not None else float(self.params["sparsity"])

    def describe(self, step: int) -> dict:
        phase = ("fixed" if step >= self.prune_step else "l1" if in_range(step, self.begin, self.end)
                 else "dense")
        out = {"phase": phase, "l1": self.params["l1"], "begin": self.begin, "end": self.end,
               "prune_step": self.prune_step, "threshold": float(self.tau)}
        if self.floored:
            out["held_at_min_density"] = list(self.floored)
        if self._stages:
            out["stage"] = stage_at(self._stages, step)
        return out


@dataclass
class L1PruneParams(Params):
    l1: float = param(1e-5, "Weight of the l1 penalty on the weights.", ge=0)
    sparsity: float = param(0.5, "Fraction of weights pruned at prune_at (one global threshold).",
                            ge=0, lt=1, what="a fraction in [0, 1)")
    threshold: float | None = param(None, "Prune |w| <= threshold instead of a sparsity (null: use sparsity).",
                                    ge=0, what="null or a magnitude >= 0")
    prune_at: float = param(0.5, "When to prune, as a fraction of the active range.", ge=0, le=1,
                            what="a fraction in [0, 1] of the stage")
    begin: float = param(0, "Step where the penalty starts.", time=True)
    end: float | None = param(None, "Step where the method stops (null: never).", time=True)
    stage: str | None = param(None, "Name of a recipe stage whose range replaces begin/end (null: none).")
    min_density: float = param(DEFAULT_MIN_DENSITY, "Share of each layer's weights always kept (0: no guard, "
                               "the official global threshold).", ge=0, lt=1,
                               what="a fraction in [0, 1) of each layer's weights kept (0: no guard, the official "
                                    "global threshold)")
    sigma: bool = param(False, "ST-3sigma's layer scaling: the global threshold is taken over |W| / sigma_l and "
                        "applied as tau * sigma_l, sigma_l = 1/sqrt(sum of the weight's dimensions).")

    def check(self):
        if self.sigma and self.threshold is not None:
            return [("sigma", "scales the global threshold that 'sparsity' sets; with an absolute 'threshold' it "
                              "does nothing: set 'threshold' to null or 'sigma' to false")]
        if self.end is None and self.stage is None and self.prune_at != 0:  # else the group refuses it, pathless
            return [("prune_at", "is a fraction of the active range, which has no end (end is null): set end, a "
                                 "stage with an end, or prune_at 0 (prune at begin)")]
        return density_problems(self.sparsity, self.min_density) if self.threshold is None else []


@register
class L1PruneMethod(Method):
    """Recipe method ``l1-prune`` (dual's stage 2, docs/methods/dual.md); params (:class:`L1PruneParams`):

    * ``l1`` (1e-5): weight of the ℓ1 penalty on the weights;
    * ``sparsity`` (0.5) or ``threshold`` (null): what the global magnitude pruning removes at
      ``prune_at`` (0.5, a fraction of the active range), after which the masks are fixed;
    * ``begin`` (0), ``end`` (null) or ``stage``: the active range;
    * ``min_density`` (0.01): share of each layer's weights the global pruning always keeps;
    * ``sigma`` (false): ST-3σ's layer scaling of the global threshold (docs/methods/dual.md).
    """

    name = "l1-prune"
    own_forward = "run"  # its layer computes through SparseWeightMixin.forward_with
    description = "Weight ℓ1 penalty, then global magnitude-threshold pruning with fixed masks (dual stage 2)"
    Params = L1PruneParams
    group_class = L1PruneGroup

    def apply(self, site, params) -> None:
        site.replace(L1PRUNE_CLASSES[weight_base(site.module)].from_dense(site.module))
