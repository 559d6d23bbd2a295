"""STR: soft threshold reparameterization (Kusupati et al., ICML 2020; repo RAIVNLab/STR).

Each layer computes with ``Ŵ = sign(W) ⊙ ReLU(|W| − sigmoid(s))`` where ``s`` is learned by the
optimizer like any weight (plain autograd: ``∂L/∂W = ∂L/∂Ŵ ⊙ 1[|W| > sigmoid(s)]``). Sparsity
comes from weight decay on ``W`` **and on s** (decay pulls a very negative ``s`` toward 0, which
raises the threshold). See docs/methods/str.md.

``granularity``: ``"layer"`` (one value per layer, the paper's), ``"channel"`` (one per output
channel), or ``"global"`` (one value shared by every layer of the rule; it is registered once,
on the group, as ``sparsify_state.groups.<rule>.s``). A single threshold is a 1-element tensor,
not a 0-d one (as the official ``sparseThreshold``, and because FSDP2 shards no 0-d parameter);
a 0-d ``s`` in an older checkpoint is reshaped on load. ``s`` and the sigmoid are float32 even
under autocast or after ``model.half()``.

``sparsify.param_groups(model, weight_decay)`` gives every ``s`` the decay ``threshold_decay``
(default: ``weight_decay``, as in the paper), and ``sparsify.step`` warns once when an optimizer
steps an ``s`` without weight decay (the user would get no sparsity).

Three parts: the STR weight, plain and in one pass with custom autograd (``kernel.py``); the layers
(``layer.py``); the group and the recipe method (``method.py``).
"""
from __future__ import annotations

from sparsify.methods.str.kernel import soft_threshold, str_threshold, str_weight
from sparsify.methods.str.layer import STR_CLASSES, STRMixin
from sparsify.methods.str.method import STRGroup, STRMethod, STRParams
from sparsify.methods.str import layer as _layer

__all__ = ["STRMethod", "STRMixin", "str_weight", "str_threshold", "soft_threshold", "STRGroup", "STRParams",
           "STR_CLASSES"]


def __getattr__(name: str):
    # the layer classes by name (STRConv2d, ...; STRConv1D is made on first use): models pickled
    # with torch.save(model) while STR was one module look them up here
    return getattr(_layer, name)
