"""Multiplies of Conv/Linear weights that no module call sees, for :func:`sparsify.measure`.

``measure`` counts a layer through its module's forward hook. Two common patterns multiply a
layer's weight without calling the layer: ``nn.MultiheadAttention`` hands ``in_proj_weight`` and
``out_proj.weight`` to ``F.multi_head_attention_forward``, and some forwards pass ``layer.weight``
to ``F.linear`` themselves (torchvision's Swin). A torch function mode watches those calls:

* ``F.linear(x, W)`` with a layer's weight (or, in a sparsified model, its effective weight),
  outside that layer's own call: counted like the layer's own call would be.
* ``F.linear`` / ``F.conv1d/2d/3d`` with a 2-d or larger parameter of a module that is no
  Conv/Linear (a finalized SAS layer: a ``GraphModule`` holding the wide weight; a layer class
  of another library that calls the functions itself): counted under that module's name (and
  the parameter's, when it is not ``weight``).
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

from sparsify.core.counted import CountedLayer
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.prepare.hidden_positions import MHA_IN_PROJ, MHA_OUT_PROJ, MHA_SEPARATE, recording, weight_owner

__all__ = ["FunctionalReads", "linear_counts", "conv_counts", "weight_holders", "counted_elsewhere"]

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")

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


@torch.no_grad()
def conv_counts(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                out_mask: torch.Tensor | None = None) -> Counts | None:
    """Counts of ``F.conv{1,2,3}d(x, w, ...)`` (zero padding) with output ``y``: a conv of the 0/1
    input indicator with the per-group number of non-zero weights gives the products per output
    position; ``out_mask`` (the output positions computed) keeps those positions only.

    >>> x = torch.tensor([[[0., 1., 1.]]]); w = torch.tensor([[[1., 0.]]])
    >>> conv_counts(w, x, torch.nn.functional.conv1d(x, w))  # 2 positions x 2 taps; 1 product is non-zero
    (4, 1, 1, 3)
    """
    if x.dim() != w.dim() or x.shape[1] != w.shape[1] * groups:
        return None
    cout_g = w.shape[0] // groups
    # float32 counts are exact below 2**24 products per output position
    dtype = torch.float32 if w[0].numel() * cout_g < 2 ** 24 else torch.float64
    # non-zero weights per (group, input channel, tap), summed over the group's output channels
    per_tap = (w != 0).reshape(groups, cout_g, *w.shape[1:]).sum(1).to(dtype)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    counts = fn((x != 0).to(dtype), per_tap, None, stride, padding, dilation, groups)  # (N, g, *out)
    if out_mask is not None:
        counts = counts * out_mask.to(dtype)
    dense = y.numel() // w.shape[0] * w.numel()
    mult = float(counts.sum(dtype=torch.float64))
    return dense, int(round(mult)), int((x == 0).sum()), x.numel()


def weight_holders(root: nn.Module, skip: Callable[[nn.Module], bool]):
    """(name, module, parameter) of each 2-d or larger parameter a module holds itself, for the
    modules ``skip`` does not rule out; named after the module, with the parameter's own name
    unless it is ``weight``.

    >>> [name for name, _, _ in weight_holders(nn.Sequential(nn.Bilinear(2, 2, 1)), lambda m: False)]
    ['0']
    """
    for name, mod in root.named_modules():
        if skip(mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2:
                yield (name if pname == "weight" else f"{name}.{pname}" if name else pname), mod, p


def counted_elsewhere(mod: nn.Module) -> bool:
    """Whether ``mod``'s own call (a Conv/Linear, an accelerated layer) or its attention function
    counts its weights, or its weight is looked up, not multiplied (an embedding)."""
    return isinstance(mod, WEIGHT_TYPES + (CountedLayer, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag))


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
        # other modules' weights handed to F.linear / F.conv*: a Conv/Linear's (its own call
        # counts it, else the code above) or an attention's stay theirs (a tied embedding's too)
        for name, mod, p in weight_holders(root, counted_elsewhere):
            self.names.setdefault(id(p), (name, id(mod)))
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
        elif func in _CONVS and len(args) > 1 and isinstance(result, torch.Tensor):
            layer = self._layer(args[1])
            if layer is not None and layer[1] not in self.inside:
                geometry = dict(zip(_CONV_ARGS, args[3:]), **{k: v for k, v in kwargs.items() if k in _CONV_ARGS})
                self._count(layer[0], conv_counts(args[1], args[0], result, **geometry))
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
