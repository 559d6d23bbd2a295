"""Measured activation sparsity and effective MACs of a model on real batches (used by
``sparsify train`` / ``demo``).

For every Conv/Linear layer (sparse subclasses included) a forward hook counts the zeros of the
layer's input and the *effective* multiplies, those whose weight AND input activation are both
non-zero (the count of the dual-sparse-training paper). The count is exact: the layer is run on
the indicator tensors ``1[x != 0]`` and ``1[W != 0]``. Zero padding is counted as non-zero input,
so a dense model's effective MACs equal its dense MACs (the convention of ``sparsify.stats.macs``).
A SAS layer (weight k times wider than its input: one of k slots is non-zero per input) is
counted as the narrow layer on its non-zero inputs, and its input sparsity is that of its k slots; other layers whose weight does not match
their input are counted at their non-zero-weight MACs.

Weights multiplied outside their layer's own call (``nn.MultiheadAttention``'s projections, read
inside ``F.multi_head_attention_forward``; a forward's own ``F.linear(x, layer.weight)``) are
counted through :class:`~sparsify.stats.functional_reads.FunctionalReads`, summed over a forward's
calls and divided by the samples; the attention's output projection, whose input nothing sees,
counts every input as non-zero and adds nothing to the activation sparsity.

``sparsify.measure`` counts by another convention (padding as zero input, SAS layers at their
wide weight on their input's slots, masked output positions skipped), so only its weight view and batch loop are
shared here: the numbers ``train`` / ``demo`` report keep the paper's convention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.eval_loop import run_eval
from sparsify.stats.functional_reads import FunctionalReads
from sparsify.stats.layer_counts import _transpose_counts, _weight
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.conv1d import CONV_TRANSPOSE_TYPES, linear_like

__all__ = ["activation_stats"]


def _lifted(w: torch.Tensor, in_dim: int) -> bool:
    """SAS-style layer: the weight is k times wider than the input (k slots, one non-zero)."""
    return w.shape[1] != in_dim and w.shape[1] % in_dim == 0


def _effective(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> float | None:
    ix, iw = (x != 0).to(torch.float32), (w != 0).to(torch.float32)
    in_dim = x.shape[-1] if linear_like(m) else x.shape[1] // getattr(m, "groups", 1)
    if _lifted(w, in_dim):
        # each non-zero input meets one slot's weight per output: count as the narrow layer
        # (exact when no weight of the chosen slot is zero)
        iw = torch.ones((w.shape[0], in_dim) + tuple(w.shape[2:]), dtype=torch.float32, device=w.device)
    if linear_like(m):
        if ix.shape[-1] != iw.shape[1]:
            return None
        return float(F.linear(ix, iw).sum())
    if not isinstance(m, nn.Conv2d) or ix.shape[1] != iw.shape[1] * m.groups or m.padding_mode != "zeros":
        return None
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:
            return None
    ix = F.pad(ix, (pad[1], pad[1], pad[0], pad[0]), value=1.0)
    return float(F.conv2d(ix, iw, None, m.stride, 0, m.dilation, m.groups).sum())


@torch.no_grad()
def activation_stats(model: nn.Module, batches, *, max_batches: int | None = None) -> dict:
    """Run ``model`` in eval mode on ``batches`` (an iterable of input tensors or ``(x, y)``) and
    return ``{"layers": {name: {"input_sparsity", "effective_macs"}}, "activation_sparsity",
    "effective_macs", "dense_macs"}``; MACs are per sample. ``activation_sparsity`` pools the
    inputs of every Conv/Linear layer except the first (which reads the data itself).

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> s = activation_stats(net, [torch.randn(16, 4)])
    >>> 0.0 < s["activation_sparsity"] < 1.0 and s["dense_macs"] == 48
    True
    >>> layer = nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0, batch_first=True)
    >>> activation_stats(layer, [torch.ones(2, 3, 4)])["dense_macs"]  # 3 tokens x (48 + 16 + 32 + 32)
    384.0
    """
    layers: dict[str, dict] = {}
    order: list[str] = []
    handles = []
    inside: set[int] = set()  # layers whose own call ran: their hook counts them
    functional: dict[str, list] = {}  # name -> [dense, effective, zeros, elements], summed over the batches

    def add_functional(name, counts):
        acc = functional.setdefault(name, [0, 0, 0, 0])
        for i in range(4):
            acc[i] += counts[i]
        if name not in order:
            order.append(name)

    for name, m in model.named_modules():
        if not isinstance(m, WEIGHT_TYPES):
            continue
        handles.append(m.register_forward_pre_hook(lambda mod, inp: inside.add(id(mod))))

        def hook(mod, inp, out, name=name):
            x = inp[0]
            k = 1
            if isinstance(mod, CONV_TRANSPOSE_TYPES):  # every input element meets every weight of its channel
                dense, eff, _, _ = _transpose_counts(mod, x)
                dense_ps = dense / x.shape[0]
            else:
                w = _weight(mod)
                positions = out.numel() / out.shape[0] / w.shape[0]
                in_dim = x.shape[-1] if linear_like(mod) else x.shape[1] // getattr(mod, "groups", 1)
                dense_ps = (w.numel() // (w.shape[1] // in_dim) if _lifted(w, in_dim) else w.numel()) * positions
                eff = _effective(mod, x, w)
                if eff is None:  # count the weight's non-zeros at every output position
                    eff = float(torch.count_nonzero(w)) * positions * out.shape[0]
                k = w.shape[1] // in_dim if _lifted(w, in_dim) else 1
            rec = layers.setdefault(name, {"zeros": 0, "elements": 0, "effective": 0.0, "samples": 0,
                                           "dense": dense_ps})
            if name not in order:
                order.append(name)
            # a SAS layer reads k slots per input element, at most one non-zero: its input
            # sparsity is that of the slots (the activation sparsity the method creates)
            rec["zeros"] += k * x.numel() - int(torch.count_nonzero(x))
            rec["elements"] += k * x.numel()
            rec["effective"] += eff
            rec["samples"] += out.shape[0]
        handles.append(m.register_forward_hook(hook))
    # the fused attention fast path multiplies the projections where no function mode sees them
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        samples = run_eval(model, batches, lambda b: (b[0] if isinstance(b, (tuple, list)) else b,), max_batches,
                           handles, lambda: FunctionalReads(model, inside, add_functional))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    for name, (dense, eff, zeros, elements) in functional.items():
        if name not in layers:  # per sample: summed over a forward's calls, divided by the samples
            n = max(samples, 1)
            layers[name] = {"zeros": zeros, "elements": elements, "effective": eff / n, "samples": 1, "dense": dense / n}
    out_layers = {}
    for name in order:
        r = layers[name]
        out_layers[name] = {"input_sparsity": r["zeros"] / r["elements"] if r["elements"] else 0.0,
                            "effective_macs": r["effective"] / r["samples"], "dense_macs": r["dense"]}
    inner = order[1:]
    zeros = sum(layers[n]["zeros"] for n in inner)
    elems = sum(layers[n]["elements"] for n in inner)
    return {"layers": out_layers,
            "activation_sparsity": zeros / elems if elems else 0.0,
            "effective_macs": sum(v["effective_macs"] for v in out_layers.values()),
            "dense_macs": sum(v["dense_macs"] for v in out_layers.values())}
