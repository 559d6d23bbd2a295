"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017), the baseline of SparseML and torch.ao.

Hard masks: the forward multiplies with ``W ⊙ M`` (pruned weights get zero gradient, latent
values are kept), and ``M`` is recomputed from ``|W|`` every Δt steps (``frequency``; default
100 as in Zhu & Gupta, fewer in a short ramp) while the cubic schedule
``r_t = s·(1 − (1 − (t−begin)/(end−begin))³)`` ramps up; from the ``fix`` step (default:
``end``, as in Zhu & Gupta) the mask is frozen. See docs/methods/magnitude.md.

* ``scope="global"``: one threshold over all layers of the rule (exact linear-interpolated
  quantile, found by :class:`~sparsify.core.threshold.QuantileTracker` without a full sort);
  ``scope="layer"``: every layer pruned to ``r_t`` on its own.
* ``block=[bo, bi]``: prune whole blocks of ``bo`` output rows × ``bi`` consecutive entries of
  the flattened input dimension (``Cin·kh·kw``; a ``Conv1D``'s weight is read as ``(out, in)``),
  scored by their mean ``|W|``; layers whose
  shape the block does not divide stay dense and ``plan`` says why.

Speed: ``|W|`` goes into the layer's (stale) ``W ⊙ M`` buffer, the global threshold is found over the
layers' ``|W|`` without concatenating them, masks are written in place, and the forward's
``W ⊙ M`` (and its backward) use a float copy of the mask and a reused product
(:func:`~sparsify.core.masked_weight.masked_weight`); see docs/performance.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsify.core.schedules import cubic
from sparsify.core.keep import (HeldLayers, DEFAULT_MIN_DENSITY, density_problems, guarded_thresholds, warn_empty,
                                 warn_short)
from sparsify.core.threshold import QuantileTracker
from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.params import Literal, Params, param
from sparsify.core.buffers import eager
from sparsify.core.layers import SparseWeightMixin, specialize, weight_base
from sparsify.core.masked_weight import masked_weight
from sparsify.core.conv1d import torch_layout

__all__ = ["MagnitudeMethod", "MagnitudeMixin", "block_scores", "expand_blocks"]


def block_scores(weight: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """Mean ``|W|`` of each ``(bo, bi)`` block of the ``(Cout, rest)`` view (``|W|`` if no block).

    >>> block_scores(torch.tensor([[1., -3., 0., 2.]]), (1, 2))
    tensor([[2., 1.]])
    """
    a = weight.detach().abs()
    if block is None:
        return a
    bo, bi = block
    a = a.reshape(1, 1, weight.shape[0], -1).float()
    return F.avg_pool2d(a, (bo, bi)).reshape(weight.shape[0] // bo, -1)


def expand_blocks(keep: torch.Tensor, block: tuple[int, int] | None, shape: torch.Size) -> torch.Tensor:
    """The element mask of ``shape`` from a block mask (identity without blocks).

    >>> expand_blocks(torch.tensor([[True, False]]), (1, 2), torch.Size([1, 4]))
    tensor([[ True,  True, False, False]])
    """
    if block is None:
        return keep
    bo, bi = block
    return keep.repeat_interleave(bo, 0).repeat_interleave(bi, 1).reshape(shape)


class MagnitudeMixin(SparseWeightMixin):
    """Conv/Linear computing with ``W ⊙ M``; ``M`` is set by the group."""

    def init_sparse(self, **params) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

    def effective_weight(self) -> torch.Tensor:
        return masked_weight(self, self.mask)

    def sparse_repr(self) -> str:
        return f"density={float(self.mask.float().mean()):.3g}"


MAGNITUDE_CLASSES = specialize(MagnitudeMixin, prefix="Magnitude")

# Zhu & Gupta (2017, §3): masks are updated every Δt steps; "varying the pruning frequency Δt
# between 100 and 1000 training steps had a negligible impact on the final model quality"
DEFAULT_INTERVAL = 100
MIN_UPDATES = 32  # a short ramp is cut into at least this many updates (else: every step)


class MagnitudeGroup(HeldLayers, Group):
    """The layers of one GMP rule: the cubic schedule, the (global or per-layer) threshold."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.begin, self.end = ctx.ramp(params, "magnitude")
        fix = ctx.time(params["fix"], "fix")
        self.fix_at = self.end if fix is None else fix
        if self.fix_at < self.end:
            raise ValueError(f"magnitude: fix ({self.fix_at}) is before end ({self.end}): the mask "
                             "would freeze before the target sparsity is reached")
        self.every = self.pruning_interval(params["frequency"], self.begin, self.end)
        self.block = tuple(params["block"]) if params["block"] else None
        self.register_buffer("tau", torch.zeros((), dtype=torch.float64))  # last global threshold
        self._trackers: dict[str, QuantileTracker] = {}  # speed only; not state
        self.floored: list[str] = []  # layers held at min_density by the last update
        self._warned: set[str] = set()

    @staticmethod
    def pruning_interval(frequency: int | None, begin: int, end: int) -> int:
        """Steps between mask updates: ``frequency`` if given, else Zhu & Gupta's Δt = 100 steps,
        shortened so that a ramp still gets at least 32 updates.

        >>> MagnitudeGroup.pruning_interval(None, 0, 100_000), MagnitudeGroup.pruning_interval(None, 10, 330)
        (100, 10)
        >>> MagnitudeGroup.pruning_interval(None, 0, 40), MagnitudeGroup.pruning_interval(1, 0, 100_000)
        (1, 1)
        """
        if frequency is not None:
            return int(frequency)
        if end <= begin:  # a one-step schedule: Δt only paces the re-selection after it (fix > end)
            return DEFAULT_INTERVAL
        return max(1, min(DEFAULT_INTERVAL, (end - begin) // MIN_UPDATES))

    def target(self, step: int) -> float:
        return cubic(step, self.begin, self.end, self.params["sparsity"])  # begin == end: a step

    def _tracker(self, key: str) -> QuantileTracker:
        return self._trackers.setdefault(key, QuantileTracker())

    def reads_weights(self, step: int) -> bool:
        return (step <= self.fix_at and self.target(step) > 0
                and not ((step - self.begin) % self.every and step not in (self.end, self.fix_at)))

    def writes_weights(self, step: int) -> bool:
        return False  # its update writes masks, never the weights

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        layers = list(self.members.items())
        if step > self.fix_at:
            return  # frozen
        r = self.target(step)
        if r <= 0:
            for _, m in layers:
                m.mask.fill_(True)
            return
        if (step - self.begin) % self.every and step not in (self.end, self.fix_at):
            return  # not a pruning step
        live = eager()
        scores = {n: self._scores(m, live) for n, m in layers}
        md = float(self.params["min_density"])
        if self.params["scope"] == "global":
            # the official global threshold unless a layer would fall below min_density
            # (docs/methods/magnitude.md): then that layer keeps its floor, the others prune more
            names = list(scores)
            found, capped = guarded_thresholds([s.reshape(-1) for s in scores.values()], r, md,
                                               self._tracker("global"), self._tracker("rest"))
            self.floored = [names[i] for i in capped]
            self.tau.fill_(float(found[next((i for i in range(len(names)) if i not in capped), 0)]))
            taus = dict(zip(names, found))
        else:
            taus = {n: self._tracker(n)(s.reshape(-1), r) for n, s in scores.items()}
        for n, m in layers:
            if self.block is None and live:
                # through a float 0/1 (bool outputs are slow to write), kept for the forward
                mask_f = torch.gt(scores[n], taus[n], out=m.scratch("mask_f", m.weight))
                m.mask.copy_(mask_f)
                m.store_cached("mask_f", mask_f, m.mask)
            elif self.block is None:
                torch.gt(scores[n], taus[n], out=m.mask)
            else:  # blocks of the (out, in) layout: transposed back for a Conv1D
                w = torch_layout(m, m.weight)
                m.mask.copy_(torch_layout(m, expand_blocks(scores[n] > taus[n], self.block, w.shape)))
        warn_empty("magnitude", {n: m.mask for n, m in layers}, self._warned, md)
        if step >= self.end:
            warn_short("magnitude", {n: m.mask for n, m in layers}, r, self._warned)

    def _scores(self, m: MagnitudeMixin, live: bool) -> torch.Tensor:
        """The layer's float32 scores (``|W|``, or block means), into a scratch tensor if possible."""
        if self.block is None and live and m.weight.dtype == torch.float32:
            # into the buffer of the forward's W ⊙ M: stale now (W changed; update() dropped it)
            # and rewritten by the next forward, so |W| costs no weight-sized tensor of its own
            return torch.abs(m.weight, out=m.scratch("masked", m.weight))
        if self.block is None:  # in the weight's own layout, as the mask (a Conv1D's is (in, out))
            return m.weight.detach().abs().float()
        return block_scores(torch_layout(m, m.weight), self.block).float()

    def describe(self, step: int) -> dict:
        phase = ("dense" if step < self.begin else "ramp" if step < self.end else
                 "fixed" if step >= self.fix_at else "hold")
        out = {"phase": phase, "scope": self.params["scope"], "begin": self.begin, "end": self.end,
               "fix": self.fix_at}
        if self.params["scope"] == "global":
            out["threshold"] = float(self.tau)
        if self.floored:
            out["held_at_min_density"] = list(self.floored)
        if self.block:
            out["block"] = list(self.block)
        return out


@dataclass
class MagnitudeParams(Params):
    ramp_end = True
    sparsity: float = param(0.9, "Target fraction of zero weights.", ge=0, lt=1, what="a fraction in [0, 1)")
    begin: float = param(0, "Step where the cubic ramp starts.", time=True)
    end: float = param(0, "Step where the ramp reaches `sparsity`.", time=True)
    fix: float | None = param(None, "Step from which the masks are frozen (null: at end).", time=True)
    scope: Literal["global", "layer"] = param("global", "One threshold over the rule's layers, or one per layer.")
    block: list[int] | None = param(None, "[rows, cols] blocks pruned as a whole (null: single weights).",
                                    what="null or [rows, cols] of positive integers")
    frequency: int | None = param(None, "Steps between mask updates (null: Zhu & Gupta's 100, fewer in a short ramp).",
                                  ge=1, what="null (Zhu & Gupta's 100 steps, fewer in a short ramp) or a whole "
                                             "number of steps >= 1")

    min_density: float = param(DEFAULT_MIN_DENSITY, "Share of each layer's weights always kept (0: no guard, "
                               "the official global threshold).", ge=0, lt=1,
                               what="a fraction in [0, 1) of each layer's weights kept (0: no guard, the official "
                                    "global threshold)")

    def check(self):
        b = self.block
        if b is not None and not (len(b) == 2 and all(x >= 1 for x in b)):
            return [("block", f"must be null or [rows, cols] of positive integers, got {b!r}")]
        return density_problems(self.sparsity, self.min_density)


@register
class MagnitudeMethod(Method):
    """Recipe method ``magnitude`` (GMP, docs/methods/magnitude.md); params (:class:`MagnitudeParams`):

    * ``sparsity`` (0.9) reached by a cubic ramp from ``begin`` (0) to ``end`` (0), masks updated
      every ``frequency`` steps (null: 100, fewer in a short ramp), frozen from ``fix`` (null: at ``end``);
    * ``scope`` ("global" or "layer"); ``block`` (null or [rows, cols]): block pruning;
    * ``min_density`` (0.01): share of each layer's weights a global threshold always keeps.
    """

    name = "magnitude"
    own_forward = "run"  # its layer computes through SparseWeightMixin.forward_with
    description = "GMP: magnitude pruning with a hard mask and a cubic schedule (global or per-layer, unstructured or block)"
    Params = MagnitudeParams
    group_class = MagnitudeGroup

    def out_channel_state(self, params: dict) -> bool:
        return bool(params["block"])  # blocks of output rows

    def accepts(self, site):
        why = super().accepts(site)
        block = (site.params or {}).get("block")
        if why or not block:
            return why
        w = torch_layout(site.module, site.module.weight)
        rest = w[0].numel()
        if w.shape[0] % block[0] or rest % block[1]:
            return (f"block {block[0]}x{block[1]} does not divide its weight "
                    f"({w.shape[0]} x {rest} as out x in·kh·kw)")
        return None

    def apply(self, site, params) -> None:
        site.replace(MAGNITUDE_CLASSES[weight_base(site.module)].from_dense(site.module))
