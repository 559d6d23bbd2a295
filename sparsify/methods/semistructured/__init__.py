"""Semi-structured activation sparsity (Grimaldi et al., ICCV-W 2023; repo Deeplite/activ-sparse).

A :class:`PositionMask` node right after each selected conv (before its BatchNorm) multiplies the
conv output by a 2-D mask over output positions, shared by every channel and sample:
``y = conv(x) ⊙ m[h, w]``, i.e. whole im2col columns (patches) are dropped. See
docs/methods/semistructured.md.

Masks: one random score map U[0, 1) at the network's input resolution, avg-pooled
(``adaptive_avg_pool2d``) to each layer's output size; the ``round(s·H·W)`` lowest scores are
dropped, so layers of equal resolution share their mask. Schedule ``s(t) = s_final·(1 − (1 − p)²)``
with ``p = clip((t − begin)/(end − begin), 0, 1)``. During the ramp a new map is drawn after every
optimizer step; the map whose step had the lowest training loss (``sparsify.step(model,
loss=loss)``) is kept, a map drawn at sparsity 0 never counts, and at ``end`` the kept map is
frozen at ``s_final``. Under ``torch.distributed`` the map is broadcast from rank 0 and the loss
is averaged over ranks before the comparison, so every rank holds the same masks. No rescaling;
masks stay on in eval mode.

Parts: the node, its deployed form and the 0/1 map (``mask.py``), the group that schedules, draws
and freezes the maps (``group.py``), the resolution checks (``resolution.py``) and the recipe
method (``method.py``).
"""
from __future__ import annotations

from sparsify.methods.semistructured.mask import DeployedPositionMask, PositionMask
from sparsify.methods.semistructured.method import (SemiStructuredGroup, SemiStructuredMethod, SemiStructuredParams,
                                                    input_size_of, position_mask)

__all__ = ["PositionMask", "DeployedPositionMask", "SemiStructuredGroup", "SemiStructuredMethod",
           "SemiStructuredParams", "position_mask", "input_size_of"]
