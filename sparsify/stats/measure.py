"""``sparsify.measure``: activation sparsity and multiplicative MACs measured on real batches.

For every regularizer node (``tl1``, ``activation-l1``, ``activation-hoyer``) and every
semi-structured :class:`~sparsify.methods.semistructured.PositionMask` node: the fraction of exact
zeros in what it sees, and their element-weighted global value. For every Conv/Linear layer: the
dense MACs and the multiplicative MACs of docs/methods/dual.md (the paper's count), where a multiply counts only when the
weight *and* the input activation are both non-zero (and, after a position mask, only at output
positions the mask keeps: those are never computed; so too before a module whose
``computed_positions()`` names them, as the fill that ``finalize(accelerate=...)`` leaves after a
masked conv it keeps dense). Padding zeros are zero inputs; dense MACs
count them, as ``macs.py`` does. Weights multiplied outside their module's call
(``nn.MultiheadAttention``'s projections, ``F.linear(x, layer.weight)``, a finalized SAS layer's
``F.conv2d`` of its wide weight) are counted too (:mod:`sparsify.stats.functional_reads`), and so
are the accelerated layers of ``finalize(accelerate=...)``, as the plain layer each computes
(:class:`~sparsify.core.counted.CountedLayer`). A module holding a weight none of these count is
named in ``Measurement.uncounted``, never dropped silently.

The count per layer is exact and cheap: a conv of the 0/1 input indicator with the per-group
number of non-zero weights (summed over output channels), i.e. one small conv per layer
(:mod:`sparsify.stats.layer_counts`). What a batch gives the model, and the argument checks, are in
:mod:`sparsify.stats.measure_inputs`.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from sparsify.core.eval_loop import run_eval
from sparsify.prepare.inputs import describe_inputs, misfit_error
from sparsify.stats.functional_reads import FunctionalReads, counted_elsewhere, weight_holders
from sparsify.stats.layer_counts import _computed_positions, _layer_counts
from sparsify.stats.measure_inputs import _BATCHES, _check_arguments, _default_inputs, _given_inputs, _one_batch
from sparsify.core.counted import CountedLayer
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.conv1d import out_features_of
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
    #: "name (Class)" of each module holding a 2-d or larger parameter of which no multiply was
    #: counted (an LSTM, a layer class computing by its own kernel): its MACs are in no row or total
    uncounted: list[str] = field(default_factory=list)

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
                "layers": [asdict(r) for r in self.layers], "uncounted": list(self.uncounted),
                "zero_fraction": self.zero_fraction,
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
        if self.uncounted:
            lines.append(f"not counted, in no row or total (modules holding weights measure saw no Conv/Linear "
                         f"multiply of; a table only added or indexed has none): {', '.join(self.uncounted)}")
        return "\n".join(lines)


@torch.no_grad()
def measure(model: nn.Module, batches: Iterable, *, input_fn: Callable | None = None,
            max_batches: int | None = None) -> Measurement:
    """Run ``model`` in eval mode over ``batches`` and measure activation zeros and MACs.

    ``batches`` (a DataLoader or a list, never one tensor) yields a tensor (the input), a dict of
    keyword inputs bound to forward's parameters as ``sparsify(example_inputs=dict)`` binds them
    (a Hugging Face batch, ``labels`` included when forward takes them), or a tuple/list whose
    first item is the input (as ``(x, y)`` loaders do); ``input_fn(batch)`` returning the model's
    positional inputs as a tuple (or one tensor, or a dict) handles anything else. Batches the
    model's first forward rejects raise a one-line ``ValueError``. Works on any model; the per-node
    rows need a model made by ``sparsify`` with ``tl1``, ``dual`` or ``semi-structured`` (for a
    baseline, sparsify with ``lam=0``: the nodes then measure without regularizing). Under DDP,
    call it on each rank: the counts are per rank.

    >>> import torch, torchvision, sparsify
    >>> m = sparsify.sparsify(torchvision.models.resnet18(), "tl1", example_inputs=torch.randn(1, 3, 32, 32))
    >>> r = sparsify.measure(m, [torch.randn(2, 3, 32, 32)])
    >>> len(r.nodes), 0 < r.zero_fraction < 1, r.mult_macs < r.dense_macs
    (17, True, True)
    """
    _check_arguments(batches, input_fn, max_batches)
    root = unwrap(model)
    seen = {"batches": 0, "forwards": 0, "inputs": ()}

    def inputs_of(batch):
        inputs = _default_inputs(root, batch) if input_fn is None else _given_inputs(root, input_fn(batch))
        seen["batches"] += 1
        seen["inputs"] = inputs
        return inputs

    node_zero: dict[str, list[int]] = {}
    node_kind: dict[str, str] = {}
    layer_acc: dict[str, list] = {}
    mask_after: dict[int, nn.Module] = {}
    handles = []

    def node_hook(name, kind):
        def hook(mod, inp, out):
            t = out if kind == "mask" else inp[0]
            if isinstance(t, torch.Tensor):
                acc = node_zero.setdefault(name, [0, 0])
                acc[0] += int((t == 0).sum())
                acc[1] += t.numel()
        return hook

    # a PositionMask (or a module that says computed_positions()) right after a conv: that conv's
    # other output positions are never computed
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
                if isinstance(mod, PositionMask) or callable(getattr(mod, "computed_positions", None)):
                    src = node.args[0]
                    if getattr(src, "op", None) == "call_module":
                        mask_after[id(prefix_mod.get_submodule(src.target))] = mod

    def layer_hook(name, counted_as=None):
        # counted_as: an accelerated layer's (plain layer, output positions it computes)
        def hook(mod, inp, out):
            inside.discard(id(mod))
            if not inp or not isinstance(inp[0], torch.Tensor):
                return
            out_mask = _computed_positions(mask_after.get(id(mod)))
            if counted_as is not None:
                mod, out_mask = counted_as
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

    @contextlib.contextmanager
    def each_forward():
        # only a first forward's error is about the batches; later ones are the model's own
        try:
            with watch():
                yield
        except Exception as e:
            if seen["forwards"] == 0:
                raise misfit_error("measure: batches", root, seen["inputs"], e, "pass batches of what the model's "
                                   "forward takes, batch first (input_fn=... picks them out of each batch)") from None
            if (shapes := _one_batch(batches, seen["forwards"])) is not None:
                raise ValueError(f"{_BATCHES}, but this {type(batches).__name__} looks like one (input, target) batch "
                                 f"(shapes {shapes}): its first item ran, its item {seen['forwards']} does not fit "
                                 "the model: pass [batch]") from None
            raise
        seen["forwards"] += 1

    # modules holding weights no hook counts (a hook on one would not run where the traced graph
    # inlined its code): named when nothing under their name was counted
    holders = {id(mod): (name, mod) for name, mod, _ in weight_holders(root, counted_elsewhere)}
    for name, mod in root.named_modules():
        if isinstance(mod, CountedLayer):
            handles.append(mod.register_forward_pre_hook(enter))
            handles.append(mod.register_forward_hook(layer_hook(name, mod.counted_as())))
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
        samples = run_eval(root, batches, inputs_of, max_batches, handles, each_forward)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    if not seen["batches"]:
        raise ValueError("measure: batches yielded no batch (an empty DataLoader or list?)")
    if not samples:
        raise ValueError(f"measure: batches hold 0 samples (the last: shapes {describe_inputs(seen['inputs'])})")
    out = Measurement(samples)
    for name, (zeros, n) in node_zero.items():
        out.nodes.append(NodeStats(name, node_kind[name], n // samples, zeros / n if n else 0.0))
    for name, (dense, mult, zeros, n, ok) in layer_acc.items():
        out.layers.append(LayerMacs(name, int(round(dense / samples)), int(round(mult / samples)) if ok else None,
                                    zeros / n if ok and n else None))
    out.uncounted = [f"{name or 'the model'} ({type(mod).__name__})" for name, mod in holders.values()
                     if not any(k == name or k.startswith(f"{name}.") or not name for k in layer_acc)]
    return out
