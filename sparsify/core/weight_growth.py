"""Whether a sparse layer's weights are running away before any NaN.

Divergence of the latent weights can take many steps to reach NaN while the loss still looks
finite, and a weight method hides it: the pruned weights are not used, so accuracy only drifts.
ST-3 passes the loss gradient straight through to the weights its threshold zeroes; when the
threshold empties a whole output channel that a BatchNorm normalises, the batch norm's backward
scales that gradient by ``1 / sqrt(eps)`` (about 316 at eps = 1e-5), and the channel's latent
weights grow by orders of magnitude (torchvision's MobileNetV2 under ``st3``: max |w| 5 -> 500 ->
1e7 within 12 steps at lr 0.01, NaN two steps later; docs/methods/st3.md#diverging-weights).

``sparsify.step`` compares, at the steps :func:`growth_due` picks (step 1 and every 8th: the
blow-up above takes about ten steps, and the look costs a pass over the sparse weights and one
device sync), each sparse layer's largest weight with its largest weight at the first such step:
:data:`GROWTH` times larger, and at least :data:`LARGE`, is said once. Weight decay and
normalisation keep a healthy run's weights within a small factor of their start; a layer at zero
at the first look (torchvision's ViT head before training) has no scale to compare with.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from sparsify.core.diverged import local_values
from sparsify.core.layers import SparseWeightMixin

__all__ = ["GROWTH", "LARGE", "growth_due", "largest_weights", "grown", "growth_message"]

#: how many times its first largest weight a layer's largest weight must reach to be said
GROWTH = 100.0
#: and the size it must reach (a layer initialised very small may grow 100x and stay small)
LARGE = 10.0


def growth_due(step: int) -> bool:
    """Step 1 and every 8th.

    >>> [t for t in range(1, 30) if growth_due(t)]
    [1, 8, 16, 24]
    """
    return step == 1 or (step > 0 and step % 8 == 0)


@torch.no_grad()
def largest_weights(root: nn.Module) -> dict[str, float]:
    """The largest absolute weight of each sparse layer of ``root`` (one device sync per device).

    >>> import sparsify
    >>> m = sparsify.sparsify(nn.Sequential(nn.Linear(2, 2)), "gmp", total_steps=4)
    >>> _ = m.get_submodule("0").weight.data.fill_(-3.0)
    >>> largest_weights(m)
    {'0': 3.0}
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, layer in root.named_modules():
        w = getattr(layer, "weight", None) if isinstance(layer, SparseWeightMixin) else None
        w = local_values(w.detach()) if isinstance(w, torch.Tensor) else None  # this rank's shard (FSDP2)
        if w is not None and w.numel() and w.is_floating_point():
            by_device[w.device].append((name, w))
    out = {}
    for layers in by_device.values():
        peaks = torch.stack([w.abs().amax().float() for _, w in layers]).tolist()
        out.update(zip((name for name, _ in layers), peaks))
    return out


def grown(first: dict[str, float], now: dict[str, float]) -> list[tuple[str, float, float]]:
    """``(layer, first, now)`` for the layers whose largest weight grew :data:`GROWTH` times and
    to :data:`LARGE` or more, the largest growth first.

    >>> grown({"a": 0.5, "b": 1.0, "c": 0.0, "d": 1.0}, {"a": 400.0, "b": 2.0, "c": 50.0, "d": float("nan")})
    [('a', 0.5, 400.0)]
    """
    # NaN and inf are the divergence check's (core/diverged.py), said on their own
    out = [(n, first[n], v) for n, v in now.items()
           if first.get(n, 0.0) > 0 and math.isfinite(v) and v >= GROWTH * first[n] and v >= LARGE]
    return sorted(out, key=lambda r: -(r[2] / r[1]))


def growth_message(rows: list[tuple[str, float, float]], step: int, since: int) -> str:
    """The one-line warning for :func:`grown`'s rows.

    >>> growth_message([("features.1.conv.0", 0.5, 400.0)], 16, 1)[:96]
    'sparsify.step: the weights of 1 sparse layer(s) grew from step 1 to step 16 (features.1.conv.0: '
    """
    name, a, b = rows[0]
    return (f"sparsify.step: the weights of {len(rows)} sparse layer(s) grew from step {since} to step {step} "
            f"({name}: largest |w| {a:.3g} -> {b:.3g}, {b / a:.3g}x): training is diverging before any NaN; "
            "lower the learning rate. Under st3 a BatchNorm after a channel the threshold emptied amplifies "
            "the gradient its pruned weights still get: a larger BatchNorm eps bounds it "
            "(docs/methods/st3.md#diverging-weights)")
