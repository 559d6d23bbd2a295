"""What the plan lists besides Conv/Linear layers: weight matrices no method rewrites, tied weights
and frozen layers, each with the reason, so the plan's shares count every weight a forward
multiplies with.

* modules whose weights a fused kernel reads directly: ``LSTM`` / ``GRU`` / ``RNN`` and their
  cells, ``Bilinear`` (``nn.MultiheadAttention``'s projections, packed or separate, are rewritten
  through :class:`~sparsify.prepare.hidden.SparseMultiheadAttention`; one left dense is listed by
  :mod:`sparsify.prepare.dense`);
* bare ``nn.Parameter`` s (owned by a module that is no weight layer) that a traced forward multiplies
  with ``F.linear``, ``F.conv*``, ``matmul`` and friends (as their weight: a bias they add is none);
* the 2-D ``weight`` of a module that is no torch weight layer (PyTorch Geometric's ``Linear``, a
  MoE router), unless a traced forward already showed it multiplied (above);
* stacked weight matrices: a 3-D parameter of more than one matrix owned by a module that is no
  weight layer (the fused experts of Mixtral / Qwen2-MoE in transformers 5), traced or not;
* a Conv/Linear weight shared with another module (an embedding tied to the LM head) when the
  recipe's ``options.tied`` is ``"dense"`` (by default both uses share one mask: :mod:`sparsify.prepare.tied`);
* a frozen Conv/Linear (``requires_grad=False``): left as it is unless the recipe's
  ``options.frozen`` is ``"include"`` (:func:`frozen_reason`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsify.core.layers import WEIGHT_TYPES
from sparsify.prepare.plan_entry import BARE, FOREIGN_LAYER, FROZEN, OWN_KERNEL, STACKED, PlanEntry

__all__ = ["unhandled_entries", "frozen_reason"]

# (ConvTranspose1d/2d/3d are weight layers the methods rewrite: sparsify.core.layers.WEIGHT_TYPES)
_FUSED = (nn.RNNBase, nn.RNNCellBase, nn.Bilinear)
_MATMUL = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
           F.bilinear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.einsum, operator.matmul,
           "matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
# where a layer op takes the multiplied weight (position, keyword); its other tensors are added (a
# bias, addmm's input) or are the data; ops not listed multiply every operand
_WEIGHT_SLOTS = {**dict.fromkeys([F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                                  F.conv_transpose3d], {1, "weight"}),
                 F.bilinear: {2, "weight"}, torch.addmm: {1, 2, "mat1", "mat2"}}
# the layer that would hold such a weight, so that a method can rewrite it (no method rewrites a
# bilinear weight); the rest are matrix products: an nn.Linear
_LAYER_FOR = {F.conv1d: "nn.Conv1d", F.conv2d: "nn.Conv2d", F.conv3d: "nn.Conv3d",
              F.conv_transpose1d: "nn.ConvTranspose1d", F.conv_transpose2d: "nn.ConvTranspose2d",
              F.conv_transpose3d: "nn.ConvTranspose3d", F.bilinear: None}


def _multiplies(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` multiplies ``node`` by its input (the bias of ``F.conv2d`` is only added)."""
    if user.target not in _MATMUL:
        return False
    slots = _WEIGHT_SLOTS.get(user.target)
    if slots is None:
        return True
    return (any(a is node for i, a in enumerate(user.args) if i in slots)
            or any(v is node for k, v in user.kwargs.items() if k in slots))


def _advice(op) -> str:
    layer = _LAYER_FOR.get(op, "nn.Linear")
    return f"wrap it in an {layer} to sparsify it" if layer else "no method rewrites a bilinear weight"


def _weights(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters(recurse=False) if "weight" in n and p.dim() >= 2)


def unhandled_entries(root: nn.Module, graphs: dict[str, fx.GraphModule]) -> list[PlanEntry]:
    """Weight matrices outside Conv/Linear layers that no method rewrites, with why.

    >>> [e.kind for e in unhandled_entries(nn.Sequential(nn.Bilinear(2, 2, 2), nn.LSTM(2, 2)), {})]
    ['Bilinear', 'LSTM']
    """
    out = []
    for name, m in root.named_modules():
        if isinstance(m, _FUSED) and not isinstance(m, WEIGHT_TYPES):
            out.append(PlanEntry(name, type(m).__name__, None, None,
                                 f"{type(m).__name__} weights are {OWN_KERNEL}: no method rewrites them",
                                 _weights(m)))
    seen = set()
    for prefix, gm in graphs.items():
        for node in gm.graph.nodes:
            if node.op != "get_attr" or not any(_multiplies(u, node) for u in node.users):
                continue
            owner, _, attr = str(node.target).rpartition(".")
            try:
                holder = gm.get_submodule(owner) if owner else gm
                p = getattr(holder, attr)
            except AttributeError:
                continue
            full = f"{prefix}.{node.target}" if prefix else str(node.target)
            if not isinstance(p, nn.Parameter) or isinstance(holder, WEIGHT_TYPES) or full in seen:
                continue
            seen.add(full)
            user = next(u for u in node.users if _multiplies(u, node))
            fn = getattr(user.target, "__name__", str(user.target))
            out.append(PlanEntry(full, "Parameter", None, None,
                                 f"{BARE}{fn} in graph {prefix or '<root>'}: no layer to rewrite "
                                 f"({_advice(user.target)})", p.numel()))
    for name, m in root.named_modules():
        # a ParametrizationList holds the tensors a parametrized layer (weight_norm) computes its
        # weight from: that layer is listed already, with why it stays dense
        if isinstance(m, (*WEIGHT_TYPES, nn.Embedding, nn.EmbeddingBag, *_FUSED, nn.MultiheadAttention,
                          nn.utils.parametrize.ParametrizationList)):
            continue
        for pname, p in m.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if full in seen:  # a traced forward showed it multiplied: listed above
                continue
            if pname == "weight" and p.dim() == 2:
                # a layer class of another library (PyTorch Geometric's Linear, a MoE router):
                # dense, and counted, so the plan's shares are of every weight matrix
                out.append(PlanEntry(name, type(m).__name__, None, None,
                                     f"weight of a {type(m).__module__}.{type(m).__qualname__}, {FOREIGN_LAYER}: "
                                     "no method rewrites it (an nn.Linear in its place would "
                                     "be)", p.numel()))
            elif p.dim() == 3 and p.shape[0] > 1 and min(p.shape[1:]) > 1:
                out.append(PlanEntry(full, f"{type(m).__name__}.{pname}", None, None,
                                     f"{STACKED} ({' x '.join(map(str, p.shape))}) read by the forward of {type(m).__name__} "
                                     "(fused experts): no method rewrites them", p.numel()))
    return out


def frozen_reason(module: nn.Module, options: dict) -> str:
    """Why a frozen layer stays as it is ("" when it is trainable or the recipe includes frozen
    layers with ``"options": {"frozen": "include"}``).

    >>> lin = nn.Linear(2, 2).requires_grad_(False)
    >>> frozen_reason(lin, {}).split(":")[0], frozen_reason(lin, {"frozen": "include"})
    ('frozen (requires_grad=False)', '')
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.requires_grad or options.get("frozen") == "include":
        return ""
    return (f'{FROZEN}: left as it is; "options": {{"frozen": "include"}} in the recipe sparsifies it too')
