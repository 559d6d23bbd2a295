"""Outputs of a model's last layer that a weight method pruned whole.

A global threshold (st3, gmp, STR, l1-prune) can take every weight of one output row of the last
layer: that output is then its bias alone, the same for every input. For a classifier those are
classes it can no longer tell apart (a ViT's head under the default st3: 7 of its 10 rows). It is
looked at when training ends (the run's last step, finalize) and where a group fixes its masks
(its ``fix`` step; a run without ``total_steps`` is told there): a row that is zero then is dead,
whatever made it so (torchvision's ViT head starts at zero, and is not said at the start), except
the padding row of a head tied to an embedding with a ``padding_idx`` (RoBERTa's, BART's, Gemma's
pad token): that row is zero by the embedding's design and the pad token is never predicted.
Hidden layers' dead channels are structured sparsity, not said.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify.core.conv1d import grouped_transpose, torch_layout
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.sharded import is_sharded
from sparsify.core.tied import TiedUse

__all__ = ["dead_outputs", "dead_outputs_message"]


@torch.no_grad()
def dead_outputs(root: nn.Module, names: list[str]) -> list[tuple[str, list[int], int]]:
    """``(layer, zero output rows, outputs)`` for each of the sparse layers ``names`` of ``root``
    that computes some outputs with no weight at all.

    >>> import sparsify
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    >>> with torch.no_grad():
    ...     _ = net[1].weight[:2].mul_(1e-6)  # two outputs whose weights a global threshold takes
    >>> m = sparsify.sparsify(net, "gmp", sparsity=0.6, total_steps=1, begin=0, end=0)
    >>> dead_outputs(m, ["1"])
    [('1', [0, 1], 4)]
    """
    out = []
    padding = _padding_rows(root) if names else {}
    for name in names:
        try:
            layer = root.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(layer, SparseWeightMixin) or is_sharded(layer.weight) or layer.weight.is_meta:
            continue
        live = _live_outputs(layer, layer.deployed_weight())
        rows = torch.nonzero(~live).flatten().tolist()
        rows = [r for r in rows if r not in padding.get(name, ())]
        if rows:
            out.append((name, rows, live.numel()))
    return out


def _live_outputs(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Per output (channel), whether any weight computes it.

    A grouped ConvTranspose's weight is ``(in, out/groups, *kernel)``: output ``g * out/groups + j``
    reads ``weight[g * in/groups:(g + 1) * in/groups, j]``.

    >>> conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    >>> w = torch.ones(4, 3, 3, 3); w[2:, 1] = 0  # group 1's second output
    >>> _live_outputs(conv, w).tolist()
    [True, True, True, True, False, True]
    """
    if grouped_transpose(layer):
        groups = layer.groups
        per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        return per_group.ne(0).any(3).any(1).reshape(-1)
    eff = torch_layout(layer, weight)
    return eff.reshape(eff.shape[0], -1).ne(0).any(1)


def _padding_rows(root: nn.Module) -> dict[str, set[int]]:
    """``{layer: rows}``: the ``padding_idx`` of embeddings tied to each layer's weight."""
    rows: dict[str, set[int]] = {}
    for m in root.modules():
        if isinstance(m, TiedUse) and isinstance(m, nn.Embedding) and m.padding_idx is not None:
            rows.setdefault(m.tied_to, set()).add(m.padding_idx % m.num_embeddings)
    return rows


def dead_outputs_message(where: str, dead: list[tuple[str, list[int], int]]) -> str:
    """The one-line warning for :func:`dead_outputs`' layers.

    >>> print(dead_outputs_message("sparsify.finalize", [("fc", [1, 3], 10)])[:77])
    sparsify.finalize: fc: every weight of 2 of its 10 outputs pruned (rows 1, 3)
    """
    parts = []
    for name, rows, n in dead:
        shown = ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
        parts.append(f"{name}: every weight of {len(rows)} of its {n} outputs pruned (rows {shown})")
    return (f"{where}: {'; '.join(parts)}: those outputs are the same for every input (the bias, or 0 without "
            "one: classes or tokens the model can no longer tell apart); leave the last layer dense with a rule "
            '({"match": {"last": true}, "method": null})')
