"""N:M weight sparsity: N non-zeros kept in every M consecutive input channels (2:4, 1:4, ...).

Groups run along the input dimension the way sparse tensor cores consume them (NVIDIA ASP):
for a conv weight ``(Cout, Cin/groups, kh, kw)``, each group is M consecutive input channels at
a fixed ``(out, kh, kw)``; for a Linear, M consecutive input features; for transformers'
``Conv1D`` (weight ``(in, out)``), M consecutive rows of its weight at a fixed column. The N
largest ``|W|`` of each group are kept (ties: the lower index).

Training is straight-through (Zhou et al., ICLR 2021): the forward computes with ``W ⊙ M``, the
backward passes the gradient to every latent weight (pruned ones included), and the mask is
recomputed from ``|W|`` after every optimizer step from ``begin`` on. ``decay`` > 0 adds SR-STE's
``decay · (1 − M) ⊙ W`` to the gradient of pruned weights. From ``fix`` on the mask is frozen
and pruned weights get zero gradient. Layers whose input channels are not a multiple of M
(depthwise convs, an RGB stem) stay dense; ``plan`` says why. ``report`` checks every layer:
``nm_compliant`` per layer and for the group.

Four parts: the masks (``mask.py``), the gradients of ``W ⊙ M`` (``kernel.py``), the layers
(``layer.py``), the group and the recipe method (``method.py``).
"""
from __future__ import annotations

from sparsify.methods.nm.mask import nm_compliant, nm_mask
from sparsify.methods.nm.layer import NM_CLASSES, NMMixin
from sparsify.methods.nm.method import NMGroup, NMMethod, NMParams
from sparsify.methods.nm import layer as _layer

__all__ = ["NMMethod", "NMMixin", "nm_mask", "nm_compliant", "NMGroup", "NMParams", "NM_CLASSES"]


def __getattr__(name: str):
    # the layer classes by name (NMConv2d, ...; NMConv1D is made on first use): models pickled
    # with torch.save(model) while N:M was one module look them up here
    return getattr(_layer, name)
