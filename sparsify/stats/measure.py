"""``sparsify.measure``: activation sparsity and multiplicative MACs measured on real batches.

For every regularizer node (``tl1``, ``activation-l1``, ``activation-hoyer``) and every
semi-structured :class:`~sparsify.methods.semistructured.PositionMask` node: the fraction of exact
zeros in what it sees, and their element-weighted global value. For every Conv/Linear layer: the
dense MACs and the multiplicative MACs of docs/methods/dual.md (the paper's count), where a multiply counts only when the
weight *and* the input activation are both non-zero (and, after a position mask, only at output
positions the mask keeps: those are never computed). Padding zeros are zero inputs; dense MACs
count them, as ``macs.py`` does. Weights multiplied outside their module's call
(``nn.MultiheadAttention``'s projections, ``F.linear(x, layer.weight)``) are counted too
(:mod:`sparsify.stats.functional_reads`).

The count per layer is exact and cheap: a conv of the 0/1 input indicator with the per-group
number of non-zero weights (summed over output channels), i.e. one small conv per layer.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.eval_loop import run_eval
from sparsify.stats.functional_reads import FunctionalReads, linear_counts
from sparsify.core.layers import WEIGHT_TYPES, SparseWeightMixin
from sparsify.core.conv1d import CONV_TRANSPOSE_TYPES, linear_like, out_features_of, torch_layout
from sparsify.methods.regularizers import ActivationRegularizer
from sparsify.methods.semistructured import PositionMask
from sparsify.core.state import unwrap

__all__ = ["NodeStats", "LayerMacs", "Measurement", "measure"]


@dataclass
class NodeStats:
    name: str
    kind: str  # "regularizer" or "mask"
    elements: int  # per sample
    zero_fraction: float


@dataclass
class LayerMacs:
    name: str
    dense_macs: int  # per sample
    mult_macs: int | None  # per sample; None when the layer's input cannot be related to its weight
    input_zero_fraction: float | None


@dataclass
class Measurement:
    """What :func:`measure` returns: print it, or ``to_dict()`` / ``to_json()``."""

    samples: int
    nodes: list[NodeStats] = field(default_factory=list)
    layers: list[LayerMacs] = field(default_factory=list)

    @property
    def zero_fraction(self) -> float | None:
        """Element-weighted zero fraction over every measured node."""
        n = sum(s.elements for s in self.nodes)
        return sum(s.zero_fraction * s.elements for s in self.nodes) / n if n else None

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.layers)

    @property
    def mult_macs(self) -> int:
        """Multiplicative MACs; layers that could not be counted count as dense."""
        return sum(r.dense_macs if r.mult_macs is None else r.mult_macs for r in self.layers)

    @property
    def mult_reduction(self) -> float | None:
        """Fraction of the dense multiplies removed (the paper's "81.7% of multiplications")."""
        return 1.0 - self.mult_macs / self.dense_macs if self.dense_macs else None

    def to_dict(self) -> dict:
        return {"samples": self.samples, "nodes": [asdict(n) for n in self.nodes],
                "layers": [asdict(r) for r in self.layers], "zero_fraction": self.zero_fraction,
                "dense_macs": self.dense_macs, "mult_macs": self.mult_macs, "mult_reduction": self.mult_reduction}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"measured on {self.samples} samples"]
        if self.nodes:
            w = max(len(n.name) for n in self.nodes)
            lines.append(f"{'node'.ljust(w)}  kind         elements/sample  zeros")
            for n in self.nodes:
                lines.append(f"{n.name.ljust(w)}  {n.kind.ljust(11)}  {n.elements:>15,}  {100 * n.zero_fraction:5.1f}%")
            lines.append(f"activation zeros (element-weighted): {100 * self.zero_fraction:.1f}%")
        if self.layers:
            w = max(len(r.name) for r in self.layers)
            lines.append(f"{'layer'.ljust(w)}  {'dense MACs':>14}  {'mult MACs':>14}  input zeros")
            for r in self.layers:
                mm = "-" if r.mult_macs is None else f"{r.mult_macs:,}"
                iz = "-" if r.input_zero_fraction is None else f"{100 * r.input_zero_fraction:.1f}%"
                lines.append(f"{r.name.ljust(w)}  {r.dense_macs:>14,}  {mm:>14}  {iz:>11}")
            lines.append(f"Conv/Linear MACs per sample: {self.mult_macs:,} multiplicative of {self.dense_macs:,} "
                         f"dense ({100 * (self.mult_reduction or 0):.1f}% of the multiplies removed)")
        return "\n".join(lines)


def _weight(mod: nn.Module) -> torch.Tensor:
    """The weight in torch's (out, in, ...) layout (a Conv1D's transposed)."""
    return torch_layout(mod, mod.deployed_weight() if isinstance(mod, SparseWeightMixin) else mod.weight.detach())


def _conv_nd(x, w, mod):
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    pad = mod.padding
    if mod.padding_mode != "zeros":
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        pad = 0
    return fn(x, w, None, mod.stride, pad, mod.dilation, mod.groups)


@torch.no_grad()
def _layer_counts(mod: nn.Module, x: torch.Tensor, y: torch.Tensor, out_mask: torch.Tensor | None):
    """(dense MACs, multiplicative MACs, input zeros, input elements) for one call, whole batch."""
    if isinstance(mod, CONV_TRANSPOSE_TYPES):
        return _transpose_counts(mod, x)
    w = _weight(mod)
    if linear_like(mod):
        return linear_counts(w, x)
    g = mod.groups
    if x.shape[1] != w.shape[1] * g:
        return None
    cout_g = w.shape[0] // g
    # float32 counts are exact below 2**24 products per output position
    dtype = torch.float32 if w[0].numel() * cout_g < 2 ** 24 else torch.float64
    # non-zero weights per (group, input channel, tap), summed over the group's output channels
    per_tap = (w != 0).reshape(g, cout_g, *w.shape[1:]).sum(1).to(dtype)
    counts = _conv_nd((x != 0).to(dtype), per_tap, mod)  # (N, g, *out): products per position
    if out_mask is not None:
        counts = counts * out_mask.to(dtype)
    dense = y.numel() // mod.out_channels * w.numel()
    mult = float(counts.sum(dtype=torch.float64))
    return dense, int(round(mult)), int((x == 0).sum()), x.numel()


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


def _default_inputs(batch):
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],)  # (inputs, targets) as DataLoaders yield them
    if isinstance(batch, dict):
        raise TypeError("measure: batches are dicts: pass input_fn=lambda b: (b['x'],) to say what the model takes")
    raise TypeError(f"measure: cannot take model inputs from a {type(batch).__name__}; pass input_fn")


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable, *, input_fn: Callable | None = None,
            max_batches: int | None = None) -> Measurement:
    """Run ``model`` in eval mode over ``batches`` and measure activation zeros and MACs.

    ``batches`` yields a tensor (the input), or a tuple/list whose first item is the input (as
    ``(x, y)`` loaders do); ``input_fn(batch)`` returning the model's positional inputs as a tuple
    handles anything else. Works on any model; the per-node rows need a model made by
    ``sparsify`` with ``tl1``, ``dual`` or ``semi-structured`` (for a baseline, sparsify with
    ``lam=0``: the nodes then measure without regularizing). Under DDP, call it on each rank:
    the counts are per rank.

    >>> import torch, torchvision, sparsify
    >>> m = sparsify.sparsify(torchvision.models.resnet18(), "tl1", example_inputs=torch.randn(1, 3, 32, 32))
    >>> r = sparsify.measure(m, [torch.randn(2, 3, 32, 32)])
    >>> len(r.nodes), 0 < r.zero_fraction < 1, r.mult_macs < r.dense_macs
    (17, True, True)
    """
    root = unwrap(model)
    input_fn = input_fn or _default_inputs
    node_zero: dict[str, list[int]] = {}
    node_kind: dict[str, str] = {}
    layer_acc: dict[str, list] = {}
    mask_after: dict[int, PositionMask] = {}
    handles = []

    def node_hook(name, kind):
        def hook(mod, inp, out):
            t = out if kind == "mask" else inp[0]
            if isinstance(t, torch.Tensor):
                acc = node_zero.setdefault(name, [0, 0])
                acc[0] += int((t == 0).sum())
                acc[1] += t.numel()
        return hook

    # a PositionMask right after a conv: that conv's masked output positions are never computed
    for prefix_mod in root.modules():
        graph = getattr(prefix_mod, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op == "call_module":
                try:
                    mod = prefix_mod.get_submodule(node.target)
                except AttributeError:
                    continue
                if isinstance(mod, PositionMask):
                    src = node.args[0]
                    if getattr(src, "op", None) == "call_module":
                        mask_after[id(prefix_mod.get_submodule(src.target))] = mod

    def layer_hook(name):
        def hook(mod, inp, out):
            inside.discard(id(mod))
            if not inp or not isinstance(inp[0], torch.Tensor):
                return
            pm = mask_after.get(id(mod))
            out_mask = pm.mask if pm is not None and pm.enabled else None
            res = _layer_counts(mod, inp[0], out, out_mask)
            if res is None:  # dense MACs only: the input cannot be related to the weight
                add_counts(name, (out.numel() // out_features_of(mod) * mod.weight.numel(), 0, 0, 0))
                layer_acc[name][4] = False
            else:
                add_counts(name, res)
        return hook

    inside: set[int] = set()  # layers whose own forward runs now: their hook counts them

    def enter(mod, inp):
        inside.add(id(mod))

    def add_counts(name, counts):
        acc = layer_acc.setdefault(name, [0, 0, 0, 0, True])
        for i in range(4):
            acc[i] += counts[i]

    watching = [True]  # off after a first batch in which no weight was multiplied outside its layer

    def watch():
        if not watching[0]:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        mode = stack.enter_context(FunctionalReads(root, inside, add_counts))
        stack.callback(lambda: watching.__setitem__(0, mode.hits > 0))
        return stack

    for name, mod in root.named_modules():
        if isinstance(mod, WEIGHT_TYPES):
            handles.append(mod.register_forward_pre_hook(enter))
        if isinstance(mod, ActivationRegularizer):
            node_kind[name] = "regularizer"
            handles.append(mod.register_forward_hook(node_hook(name, "regularizer")))
        elif isinstance(mod, PositionMask):
            node_kind[name] = "mask"
            handles.append(mod.register_forward_hook(node_hook(name, "mask")))
        elif isinstance(mod, WEIGHT_TYPES):
            handles.append(mod.register_forward_hook(layer_hook(name)))
    # the fused attention fast path multiplies the projections where no function mode sees them
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        samples = run_eval(root, batches, input_fn, max_batches, handles, watch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    if not samples:
        raise ValueError("measure: batches yielded nothing")
    out = Measurement(samples)
    for name, (zeros, n) in node_zero.items():
        out.nodes.append(NodeStats(name, node_kind[name], n // samples, zeros / n if n else 0.0))
    for name, (dense, mult, zeros, n, ok) in layer_acc.items():
        out.layers.append(LayerMacs(name, int(round(dense / samples)), int(round(mult / samples)) if ok else None,
                                    zeros / n if ok and n else None))
    return out
