"""Multiplies of Conv/Linear weights that no module call sees, for :func:`sparsify.measure`.

``measure`` counts a layer through its module's forward hook. Two common patterns multiply a
layer's weight without calling the layer: ``nn.MultiheadAttention`` hands ``in_proj_weight`` and
``out_proj.weight`` to ``F.multi_head_attention_forward``, and some forwards pass ``layer.weight``
to ``F.linear`` themselves (torchvision's Swin). A torch function mode watches those calls:

* ``F.linear(x, W)`` with a layer's weight (or, in a sparsified model, its effective weight),
  outside that layer's own call: counted like the layer's own call would be.
* ``F.multi_head_attention_forward``: the packed input projection, from the query, key and
  value and the three row blocks of ``in_proj_weight``, or the separate ``q_proj_weight`` /
  ``k_proj_weight`` / ``v_proj_weight`` (``kdim`` / ``vdim`` other than ``embed_dim``), each from
  its own input; the output projection, whose input is computed inside the function, with every
  input element counted as non-zero (its multiplies still drop with the weight's zeros; its input
  zeros are not known).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.layers import WEIGHT_TYPES
from sparsify.prepare.hidden_positions import MHA_IN_PROJ, MHA_OUT_PROJ, MHA_SEPARATE, recording, weight_owner

__all__ = ["FunctionalReads", "linear_counts"]

Counts = tuple[int, int, int, int]  # dense MACs, multiplicative MACs, input zeros, input elements


@torch.no_grad()
def linear_counts(w: torch.Tensor, x: torch.Tensor, inputs_known: bool = True) -> Counts | None:
    """Counts of ``x @ w.T`` for ``w`` of shape (out, in); ``inputs_known=False`` counts every
    input as non-zero and reports no input elements.

    >>> linear_counts(torch.tensor([[1., 0.], [2., 3.]]), torch.tensor([[0., 5.]]))
    (4, 1, 1, 2)
    """
    if x.shape[-1] != w.shape[1]:
        return None
    rows = x.numel() // w.shape[1]
    if not inputs_known:
        return rows * w.numel(), rows * int((w != 0).sum()), 0, 0
    per_in = (w != 0).sum(0).to(torch.float64)  # products an input feature takes part in
    mult = float(((x != 0).reshape(-1, w.shape[1]).to(torch.float64) @ per_in).sum())
    return rows * w.numel(), int(round(mult)), int((x == 0).sum()), x.numel()


def _add(a: Counts | None, b: Counts | None) -> Counts | None:
    return b if a is None else a if b is None else tuple(i + j for i, j in zip(a, b))


class FunctionalReads(torch.overrides.TorchFunctionMode):
    """Calls ``add(name, counts)`` for each multiply of a layer's weight outside its own call.

    ``inside`` holds the ids of the layers whose own forward runs now (their module hook counts
    those). ``hits`` counts the calls seen, so a caller can stop watching a model that has none.

    >>> mha, seen = nn.MultiheadAttention(4, 1), {}
    >>> with FunctionalReads(mha, set(), lambda name, counts: seen.update({name: counts[:2]})):
    ...     _ = mha(*[torch.ones(3, 1, 4)] * 3)  # 3 tokens: (dense, multiplicative) MACs
    >>> seen
    {'in_proj': (144, 144), 'out_proj': (48, 48)}
    >>> cross, seen = nn.MultiheadAttention(4, 1, kdim=2, vdim=2), {}
    >>> with FunctionalReads(cross, set(), lambda name, counts: seen.update({name: counts[:2]})):
    ...     _ = cross(torch.ones(3, 1, 4), *[torch.ones(5, 1, 2)] * 2)  # 3 queries, 5 keys and values
    >>> seen
    {'q_proj': (48, 48), 'k_proj': (40, 40), 'v_proj': (40, 40), 'out_proj': (48, 48)}
    """

    def __init__(self, root: nn.Module, inside: set[int], add: Callable[[str, Counts], None]):
        super().__init__()
        self.inside, self.add, self.hits = inside, add, 0
        self.names: dict[int, tuple[str, int]] = {}  # id of a layer or its weight -> (name, id of the layer)
        for name, mod in root.named_modules():
            if isinstance(mod, WEIGHT_TYPES) and isinstance(getattr(mod, "weight", None), torch.Tensor):
                self.names[id(mod)] = self.names[id(mod.weight)] = (name, id(mod))
            if isinstance(mod, nn.MultiheadAttention):  # a dense one's projection parameters
                for proj in ("in_proj", "q_proj", "k_proj", "v_proj"):
                    weight = mod._parameters.get(f"{proj}_weight")
                    if isinstance(weight, torch.Tensor):
                        self.names[id(weight)] = (f"{name}.{proj}" if name else proj, id(weight))
        self.record: dict = {}

    def __enter__(self):
        self._recording = recording(self.record)
        self._recording.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._recording.__exit__(*exc)

    def _layer(self, w) -> tuple[str, int] | None:
        """(name, id of the layer) of a weight tensor, or None."""
        return weight_owner(w, self.record, self.names)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is F.linear and len(args) > 1:
            layer = self._layer(args[1])
            if layer is not None and layer[1] not in self.inside:
                self._count(layer[0], linear_counts(args[1], args[0]))
        elif func is F.multi_head_attention_forward:
            self._attention(args, kwargs)
        return result

    def _attention(self, args, kwargs):
        query, key, value, w_in, w_out = args[0], args[1], args[2], args[MHA_IN_PROJ], args[MHA_OUT_PROJ]
        embed = query.shape[-1]
        if kwargs.get("use_separate_proj_weight"):
            for x, arg in zip((query, key, value), MHA_SEPARATE):
                w = kwargs.get(arg)
                if (layer := self._layer(w)) is not None:
                    self._count(layer[0], linear_counts(w, x))
        elif (layer := self._layer(w_in)) is not None:
            counts, seen = None, set()
            for i, x in enumerate((query, key, value)):
                part = linear_counts(w_in[i * embed:(i + 1) * embed], x)
                if part is not None and id(x) in seen:
                    part = part[:2] + (0, 0)  # one tensor given as query and key: its zeros count once
                seen.add(id(x))
                counts = _add(counts, part)
            self._count(layer[0], counts)
        layer = self._layer(w_out)
        if layer is not None:
            self._count(layer[0], linear_counts(w_out, query, inputs_known=False))

    def _count(self, name: str, counts: Counts | None):
        self.hits += 1
        if counts is not None:
            self.add(name, counts)
