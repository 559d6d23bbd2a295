"""The counts ``sparsify.measure`` takes of one Conv/Linear call (:func:`_layer_counts`): dense
MACs, multiplicative MACs (a multiply counts when the weight and the input are both non-zero, at
the output positions computed), input zeros and elements. Also read by the run statistics of
training (:mod:`sparsify.stats.runstats`), hence a module of its own."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.conv1d import CONV_TRANSPOSE_TYPES, linear_like, torch_layout
from sparsify.core.layers import SparseWeightMixin
from sparsify.methods.sas.layer import SASMixin
from sparsify.methods.semistructured import PositionMask
from sparsify.stats.functional_reads import conv_counts, linear_counts


def _weight(mod: nn.Module) -> torch.Tensor:
    """The weight in torch's (out, in, ...) layout (a Conv1D's transposed)."""
    return torch_layout(mod, mod.deployed_weight() if isinstance(mod, SparseWeightMixin) else mod.weight.detach())


def _computed_positions(after: nn.Module | None) -> torch.Tensor | None:
    """The output positions of a conv that the module ``after`` it needs (None: all of them): a
    position mask's kept ones, or those ``after.computed_positions()`` names (accelerate's fill of
    the skipped positions of a masked conv it kept dense: the same function, the same count)."""
    if isinstance(after, PositionMask):
        return after.mask if after.enabled else None
    return None if after is None else after.computed_positions()


@torch.no_grad()
def _layer_counts(mod: nn.Module, x: torch.Tensor, y: torch.Tensor, out_mask: torch.Tensor | None):
    """(dense MACs, multiplicative MACs, input zeros, input elements) for one call, whole batch."""
    if isinstance(mod, CONV_TRANSPOSE_TYPES):
        return _transpose_counts(mod, x)
    w = _weight(mod)
    if isinstance(mod, SASMixin):  # its wide weight multiplies the slots of the input, as finalized
        dim = -1 if isinstance(mod, nn.Linear) else 2
        x = torch.stack(mod.slot_rule.slots(x), dim).flatten(dim - 1, dim)
    if linear_like(mod):
        return linear_counts(w, x)
    if x.shape[1] != w.shape[1] * mod.groups:
        return None
    pad = mod.padding
    if mod.padding_mode != "zeros":
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        pad = 0
    return conv_counts(w, x, y, mod.stride, pad, mod.dilation, mod.groups, out_mask)


def _transpose_counts(mod: nn.Module, x: torch.Tensor):
    """:func:`_layer_counts` of a ConvTranspose: input element ``(i, p)`` is multiplied by every
    weight of ``W[i]`` (``(out/groups, *kernel)``), so its products are the non-zeros of ``W[i]``."""
    w = mod.deployed_weight() if isinstance(mod, SparseWeightMixin) else mod.weight.detach()
    if x.shape[1] != w.shape[0]:
        return None
    per_in = (w != 0).reshape(w.shape[0], -1).sum(1).to(torch.float64)
    nz = (x != 0).to(torch.float64).movedim(1, -1).reshape(-1, w.shape[0])
    dense = x.numel() // w.shape[0] * w.numel()
    return dense, int(round(float((nz @ per_in).sum()))), int((x == 0).sum()), x.numel()
