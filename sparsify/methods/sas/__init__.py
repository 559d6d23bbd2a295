"""SAS: structured activation sparsification (ICLR 2024; repo DensoITLab/sas_). docs/methods/sas.md.

Each input element of a Conv/Linear is lifted into M slots of which at most one is non-zero and
the weight is M times wider along its input dimension, so the layer picks input-dependent weights
while its non-zero multiplies stay those of the narrow layer. With M = 2 (the official code) slot 0
holds relu(x), slot 1 relu(-x), and the weight ``(Cout, 2·Cin/groups, *k)`` is in the official
interleaved layout (column 2c is slot 0 of input channel c, 2c+1 slot 1), so an official
state_dict loads as is.

Three parts (``rules.py``; ``layer.py`` with its autograd function in ``kernel.py``;
``rewire.py``), brought together by ``method.py``:

* :class:`SlotRule` (``sign`` for M = 2, ``signed_levels`` for any M; register your own with
  :func:`register_slot_rule`) says how an element is lifted;
* the modules ``SASConv1d/2d/3d`` and ``SASLinear``: the weight is the official interleaved
  parameter; the forward writes the slots into a scratch buffer shared by all SAS layers (no
  zeros tensor, no masks, no fresh allocation) and runs one conv/matmul (depthwise convs: one
  narrow conv per slot; strided 1x1 convs: only the positions they read); the backward
  recomputes the slots from ``x`` instead of saving them (:class:`_SASFunction`): only ``x`` is
  kept;
* the ReLU rewiring (:func:`find_relu_input` and :meth:`SASMethod.apply`): a selected layer fed by a
  relu reads the relu's input instead, and the relu stays only for its other users.
"""
from __future__ import annotations

from sparsify.methods.sas.rules import SLOT_RULES, SignRule, SignedLevelsRule, SlotRule, make_slot_rule, register_slot_rule
from sparsify.methods.sas.kernel import release_workspaces
from sparsify.methods.sas.layer import SAS_CLASSES, SASConv1d, SASConv2d, SASConv3d, SASDeploy, SASLinear, SASMixin
from sparsify.methods.sas.rewire import find_relu_input, is_relu
from sparsify.methods.sas.method import SASGroup, SASMethod

__all__ = ["SLOT_RULES", "SignRule", "SignedLevelsRule", "SlotRule", "make_slot_rule", "register_slot_rule", "release_workspaces", "SAS_CLASSES", "SASConv1d", "SASConv2d", "SASConv3d", "SASDeploy", "SASLinear", "SASMixin", "find_relu_input", "is_relu", "SASGroup", "SASMethod"]
