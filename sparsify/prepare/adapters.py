"""Layers of PEFT adapters (LoRA's ``lora_A`` / ``lora_B``, and the other tuners of the ``peft``
library), which weight methods leave dense by default.

A PEFT model computes ``base_layer(x) + B(A(x))`` with the base layer frozen. A weight method
would rewrite what is trainable there: the low-rank factors ``A`` and ``B``. Masking them makes
nothing of the model sparse (the base weight stays dense, and the merged weight ``W + BA`` is
dense whatever zeros ``A`` and ``B`` hold), so the plan lists them as dense with this reason and
``sparsify`` warns once with the ways in: merge the adapters and unfreeze the merged model
(``model = model.merge_and_unload().requires_grad_()``) and sparse-train it, or
``"options": {"adapters": "include"}`` in the recipe to sparsify the adapter factors themselves.
Activation methods are unaffected: they regularize or mask the model's activations whatever
trains the weights. docs/integrations.md#peft-lora.

Recognised without importing ``peft``: a module whose class derives from a class named
``BaseTunerLayer`` defined in a ``peft`` module holds adapter layers, except its ``base_layer``.
"""
from __future__ import annotations

from torch import nn

__all__ = ["ADAPTER", "adapter_reason", "is_tuner_layer"]

ADAPTER = "a layer of the PEFT adapter"  # the plan's reason starts so (sparsify() warns once)


def is_tuner_layer(module: nn.Module) -> bool:
    """Is ``module`` a PEFT tuner layer (a LoRA ``Linear`` around its ``base_layer``...)?"""
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.split(".")[0] == "peft" for c in type(module).__mro__)


def adapter_reason(root: nn.Module, name: str, options: dict) -> str:
    """Why layer ``name`` of ``root`` stays dense as part of a PEFT adapter; "" when it is none,
    is the layer an adapter wraps (``base_layer``), or the recipe has ``"options": {"adapters":
    "include"}``.

    >>> BaseTunerLayer = type("BaseTunerLayer", (), {"__module__": "peft.tuners.tuners_utils"})
    >>> Lora = type("Lora", (nn.Module, BaseTunerLayer), {})
    >>> lora = Lora()
    >>> lora.base_layer, lora.lora_A = nn.Linear(8, 8), nn.ModuleDict({"default": nn.Linear(8, 2)})
    >>> root = nn.Sequential(lora)
    >>> adapter_reason(root, "0.lora_A.default", {}).split(":")[0]
    'a layer of the PEFT adapter of 0 (Lora)'
    >>> adapter_reason(root, "0.base_layer", {}), adapter_reason(root, "0.lora_A.default", {"adapters": "include"})
    ('', '')
    """
    if options.get("adapters") == "include":
        return ""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            parent = root.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if is_tuner_layer(parent):
            if parts[i] == "base_layer":
                return ""
            return (f"{ADAPTER} of {'.'.join(parts[:i])} ({type(parent).__name__}): its low-rank factors add a dense "
                    "update to the frozen base layer, so masking them makes nothing sparse; merge them and unfreeze "
                    "(model = model.merge_and_unload().requires_grad_()) before sparsify() to sparse-train the "
                    "merged weights, or "
                    '"options": {"adapters": "include"} in the recipe sparsifies the factors themselves')
    return ""
