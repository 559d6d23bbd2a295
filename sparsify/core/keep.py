"""Global thresholds that never empty a layer (the ``min_density`` guard of st3, magnitude and
l1-prune; see docs/methods/st3.md, "Layer collapse").

One global magnitude threshold prunes ``K = floor((N - 1) r) + 1`` of the ``N`` values (the
official methods' count). It can prune a whole layer whose weights happen to be small (LeNet-5's
fc2, MobileNet's classifier and depthwise convs). The guard keeps the count ``K`` and moves what a
layer may not prune to the others: every layer keeps at least ``ceil(min_density * n_l)`` of its
``n_l`` values; a layer the global threshold would push below that is *capped* (it prunes exactly
its ``n_l - keep_l`` smallest values, at a threshold of its own) and the other layers share the
remaining count under one common threshold, found again over their values alone (repeated until
no further layer is capped). When no layer reaches its floor the result is the official global
threshold, bit for bit. When the floors together leave fewer than ``K`` values prunable they
shrink in proportion: the global count always wins.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from sparsify.core.extra_state import pack, unpack
from sparsify.core.threshold import pruned_count, quantile

__all__ = ["min_kept", "guarded_thresholds", "sigma_of", "DEFAULT_MIN_DENSITY", "EmptyLayerWarning", "warn_empty",
           "empty_message", "HeldLayers", "density_problems"]

#: Default share of every layer kept by the global methods (1/10 of the average density at
#: their 90% default): enough to keep a classifier or a depthwise conv working, small enough
#: that the global allocation decides everywhere else.
DEFAULT_MIN_DENSITY = 0.01


def min_kept(sizes: Sequence[int], min_density: float, pruned: int) -> list[int]:
    """Values each layer keeps at least: ``ceil(min_density * n)``, scaled down together when
    they would leave fewer than ``pruned`` values to prune.

    >>> min_kept([100, 1000], 0.05, 900)
    [5, 50]
    >>> min_kept([100, 1000], 0.05, 1090)  # only 10 may stay: the floors shrink, the count holds
    [0, 9]
    """
    keep = [min(n, math.ceil(min_density * n)) for n in sizes]
    room = sum(sizes) - pruned
    if sum(keep) > room:
        total = sum(keep)
        keep = [k * room // total for k in keep]
    return keep


def density_problems(sparsity: float, min_density: float) -> list[tuple[str, str]]:
    """A rule's params check: the floors ``min_density`` can only all hold when the target keeps
    at least that share of the weights; above it they would shrink to the target in silence. The
    default (0.01) is let shrink above 99% sparsity (:func:`min_kept`), as documented.

    >>> density_problems(0.9, 0.5)[0][1][:60]
    'must be at most 1 - sparsity = 0.1 (every layer keeps at lea'
    >>> density_problems(0.9, 0.1), density_problems(0.995, DEFAULT_MIN_DENSITY)
    ([], [])
    """
    if min_density <= 1.0 - sparsity + 1e-12 or min_density == DEFAULT_MIN_DENSITY:
        return []
    return [("min_density", f"must be at most 1 - sparsity = {1 - sparsity:.4g} (every layer keeps at least "
                            f"min_density of its weights, and the target keeps only 1 - sparsity of them all), got "
                            f"min_density={min_density:g} with sparsity={sparsity:g}")]


def sigma_of(weight: torch.Tensor) -> float:
    """ST-3σ's layer scale ``σ = 1 / sqrt(sum of the weight's dimensions)`` (e.g. Cout+Cin+kh+kw):
    a global threshold taken over ``|W| / σ`` and applied as ``τ·σ`` prunes big layers harder.

    >>> sigma_of(torch.zeros(64, 32, 3, 3))  # 1 / sqrt(64 + 32 + 3 + 3)
    0.09901475429766744
    """
    return 1.0 / math.sqrt(sum(weight.shape))


def _level(pruned: int, n: int) -> float:
    """A quantile level whose threshold prunes exactly ``pruned`` of ``n`` distinct values
    (halfway between the two order statistics, as the interpolated quantile puts it)."""
    if n <= 1:
        return 0.0 if pruned <= 0 else 1.0
    return min(1.0, max(0.0, (pruned - 0.5) / (n - 1)))


def _count_at_or_below(v: torch.Tensor, tau) -> int:
    return int(torch.count_nonzero(v <= tau))


def guarded_thresholds(values: Sequence[torch.Tensor], q: float, min_density: float,
                       global_quantile: Callable | None = None,
                       rest_quantile: Callable | None = None) -> tuple[list[float], list[int]]:
    """Per-layer thresholds (``v <= tau`` is pruned) that prune exactly the global count of the
    ``q`` quantile over all ``values`` together while every layer keeps its :func:`min_kept`.

    ``values``: each layer's flattened scores (e.g. ``|W|``). ``global_quantile(values, q)`` and
    ``rest_quantile(values, q)`` compute exact quantiles over several tensors (default:
    :func:`~sparsify.core.threshold.quantile` of their concatenation; a
    :class:`~sparsify.core.threshold.QuantileTracker` is faster). Returns the thresholds and the
    indices of the capped layers (empty: the official global threshold everywhere).

    >>> big, small = torch.arange(1.0, 101.0), torch.linspace(0.1, 0.5, 10)
    >>> taus, capped = guarded_thresholds([big, small], 0.5, 0.2)
    >>> capped, [int((v <= t).sum()) for v, t in zip([big, small], taus)]
    ([1], [47, 8])
    >>> 47 + 8 == int((110 - 1) * 0.5) + 1
    True
    """
    values = [v.reshape(-1) for v in values]
    cat = lambda vs, level: quantile(torch.cat(vs), level)  # noqa: E731
    global_quantile = global_quantile or cat
    rest_quantile = rest_quantile or cat
    tau = global_quantile(values, q)
    if min_density <= 0:
        return [tau] * len(values), []
    sizes = [v.numel() for v in values]
    total = pruned_count(sum(sizes), q)
    cap = [n - k for n, k in zip(sizes, min_kept(sizes, min_density, total))]
    # a layer can only go below its floor when the global count exceeds what it may prune
    over = [i for i in range(len(values)) if cap[i] < total and _count_at_or_below(values[i], tau) > cap[i]]
    if not over:
        return [tau] * len(values), []
    capped: set[int] = set()
    while over:
        capped.update(over)
        rest = [i for i in range(len(values)) if i not in capped]
        left = total - sum(cap[i] for i in capped)
        if not rest:
            break
        n_rest = sum(sizes[i] for i in rest)
        tau = rest_quantile([values[i] for i in rest], _level(left, n_rest))
        over = [i for i in rest if _count_at_or_below(values[i], tau) > cap[i]]
    taus = []
    for i, v in enumerate(values):
        if i not in capped:
            taus.append(tau)
        elif cap[i] <= 0:
            taus.append(quantile(v, 0.0) - 1)  # below every value: nothing pruned
        else:
            own = quantile(v, _level(cap[i], sizes[i]))
            if _count_at_or_below(v, own) > cap[i]:
                # tied values at the layer's own threshold (a zero-initialized layer after one Adam
                # step: every |w| equal) would all go, emptying it: keep the tie instead
                below = v[v < own]
                own = below.max() if below.numel() else quantile(v, 0.0) - 1
            taus.append(own)
    return taus, sorted(capped)


class EmptyLayerWarning(UserWarning):
    """A layer lost every weight: its output no longer depends on its input."""


def warn_empty(method: str, masks: dict[str, torch.Tensor], warned: set[str], min_density: float,
               threshold: float | None = None) -> None:
    """Warn once per layer whose mask keeps nothing (``warned``: the layers already named);
    ``threshold``: the rule prunes at that absolute magnitude, which no floor guards.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn_empty("st3", {"fc": torch.zeros(3, dtype=torch.bool)}, set(), 0.0)
    >>> "fc" in str(w[0].message)
    True
    """
    empty = [n for n, m in masks.items() if n not in warned and not bool(m.any())]
    if not empty:
        return
    warned.update(empty)
    import warnings
    if threshold is not None:
        why, fix = (f"the rule's absolute threshold {threshold:g} is at or above every weight there, and "
                    "min_density guards a sparsity, not a threshold"), "lower the threshold or give a sparsity"
    else:
        why = ("min_density is 0: the official global threshold, which has no guard" if min_density <= 0 else
               f"min_density {min_density:g} left no room: the target leaves too few weights for every layer's "
               "floor")
        fix = "raise the rule's min_density or lower its sparsity"
    warnings.warn(empty_message(method, empty, why, fix), EmptyLayerWarning, stacklevel=3)


#: the key in a group's warned set once :func:`warn_short` has looked (it looks once per run)
SHORT_CHECKED = "<short-checked>"


def warn_short(method: str, masks: dict[str, torch.Tensor], target: float, warned: set[str]) -> None:
    """Once, when the ramp has reached its final ``target``: warn when the masks' sparsity misses
    it by over one point (or two weights of the smallest layer), either way. A magnitude threshold
    cannot split weights of equal magnitude (a constant initialisation, quantized or low-precision
    weights): it prunes all of those equal to it (``|W| > τ`` is kept), overshooting the target, or,
    where that would take a layer below ``min_density``, the layer's floor keeps them all. The
    official methods do the same, so this says it rather than breaking ties.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn_short("magnitude", {"fc": torch.ones(400, dtype=torch.bool)}, 0.5, set())
    >>> str(w[0].message)[:86]
    'sparsify: magnitude reached 0.0% sparsity where its target is 50.0% (fc at 0.0%): many'
    """
    if SHORT_CHECKED in warned or not masks:
        return
    warned.add(SHORT_CHECKED)
    kept = torch.stack([m.sum() for m in masks.values()]).tolist()  # one sync
    sizes = [m.numel() for m in masks.values()]
    achieved = 1 - sum(kept) / max(sum(sizes), 1)
    # a quantile over n weights lands within a weight or two of the target: small layers miss it by that
    if abs(achieved - target) <= max(0.01, 2 / max(min(sizes), 1)):
        return
    over = achieved > target
    furthest = sorted(((1 - k / n, name) for (name, _), k, n in zip(masks.items(), kept, sizes) if n),
                      key=lambda v: -v[0] if over else v[0])[:3]
    where = ", ".join(f"{name} at {a:.1%}" for a, name in furthest)
    import warnings
    warnings.warn(f"sparsify: {method} reached {achieved:.1%} sparsity where its target is {target:.1%} ({where}): "
                  "many weights have the same magnitude as the threshold (a constant initialisation, quantized or "
                  "low-precision weights), and a threshold cannot split them: "
                  + ("it prunes every weight equal to it" if over else
                     "a layer the threshold would empty below its min_density keeps them all")
                  + "; the report shows the sparsity reached (docs/methods/magnitude.md#tied-magnitudes)",
                  stacklevel=3)


def empty_message(method: str, names: list[str], why: str, fix: str) -> str:
    """The :class:`EmptyLayerWarning` text for layers ``names`` that ``method`` emptied.

    >>> empty_message("str", ["fc"], "why", "fix")
    'sparsify: str pruned every weight of fc (100% sparse: the output no longer depends on the input; why); fix'
    """
    return (f"sparsify: {method} pruned every weight of {', '.join(names)} (100% sparse: the output no longer "
            f"depends on the input; {why}); {fix}")


class HeldLayers:
    """For groups whose last update held layers at ``min_density`` (``self.floored``, reported as
    ``held_at_min_density``): the list travels in ``state_dict`` as the group's extra state, so a
    loaded model reports what the saved one did before its next update."""

    def get_extra_state(self):
        # a replaced layer stays held until the next update, and a layer swapped out since sparsify
        # (timm's reset_classifier; core/state.forget_replaced) keeps its room: the tensor an EMA
        # copy made before the swap holds must not change size
        every = set(self.members) | set(self.floored) | self.__dict__.get("_held_room", set())
        return pack({"held_at_min_density": list(self.floored)}, like={"held_at_min_density": sorted(every)})

    def set_extra_state(self, state) -> None:
        self.floored = list(unpack(state).get("held_at_min_density", []))

