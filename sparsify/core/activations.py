"""Activation modules, torch's and those other libraries define (transformers' ``GELUActivation``,
``NewGELUActivation``, ``QuickGELUActivation``, ...), recognised by class name so sparsify never
imports those libraries.

Tracing keeps every activation module one ``call_module`` node (never traced through into its
arithmetic), so rules by module type and by name reach it, and the activation methods insert after
it. A recipe's ``"type": "GELU"`` also matches the GELU variants (exact or approximations, as
``"Linear"`` also matches transformers' ``Conv1D``); each class's own name matches it alone.
"""
from __future__ import annotations

from torch import nn

__all__ = ["ALIASES", "activation_kind", "is_activation_module", "shell_activation"]

# class name -> the torch activation it computes or approximates
ALIASES = {
    "GELUActivation": "GELU", "NewGELUActivation": "GELU", "FastGELUActivation": "GELU",
    "QuickGELUActivation": "GELU", "ClippedGELUActivation": "GELU", "AccurateGELUActivation": "GELU",
    "GELUTanh": "GELU", "PytorchGELUTanh": "GELU", "SiLUActivation": "SiLU", "MishActivation": "Mish",
    "BloomGelu": "GELU",  # the tanh approximation with its own autograd function
    "MemoryEfficientSwish": "SiLU",  # efficientnet_pytorch: x * sigmoid(x) by its own autograd function
    "SwishMe": "SiLU", "MishMe": "Mish", "HardSwishMe": "Hardswish",  # timm's memory-efficient variants
    "QuickGELU": "GELU",  # timm / open_clip: x * sigmoid(1.702 x)
}

# timm's own activation modules (timm.layers.activations), which its create_act_layer builds for some
# models (EfficientFormerV2's GELU inside BatchNormAct2d): names torch uses too, so known by module
_TIMM = {"GELU": "GELU", "Swish": "SiLU", "Mish": "Mish", "Sigmoid": "Sigmoid", "Tanh": "Tanh",
         "HardSwish": "Hardswish", "HardSigmoid": "Hardsigmoid", "HardMish": "Mish", "PReLU": "PReLU",
         "HardSigmoidMe": "Hardsigmoid", "HardMishMe": "Mish"}
_TIMM_MODULES = ("timm.layers.activations", "timm.layers.activations_me")


def activation_kind(module) -> str | None:
    """The torch activation class name ``module`` is or stands for; None for other modules.

    >>> activation_kind(nn.ReLU()), activation_kind(type("NewGELUActivation", (nn.Module,), {})())
    ('ReLU', 'GELU')
    >>> activation_kind(type("Swish", (nn.Module,), {"__module__": "timm.layers.activations"})())
    'SiLU'
    >>> activation_kind(nn.Linear(1, 1)) is None
    True
    """
    for cls in type(module).__mro__:
        if cls.__module__ == "torch.nn.modules.activation" and cls is not nn.Module:
            return cls.__name__
        if cls.__name__ in ALIASES:
            return ALIASES[cls.__name__]
        if cls.__module__ in _TIMM_MODULES and cls.__name__ in _TIMM:
            return _TIMM[cls.__name__]
    return None


def is_activation_module(module) -> bool:
    """Whether ``module`` is an activation (see :func:`activation_kind`).

    >>> is_activation_module(nn.GELU()), is_activation_module(nn.Sequential())
    (True, False)
    """
    return activation_kind(module) is not None


def shell_activation(name: str, module) -> bool:
    """Give ``module`` a one-call graph of its own where an untraceable parent calls it
    (``passes.trace``'s ``shell``): an activation without parameters or buffers, so the
    state_dict keys stay as they are.

    >>> shell_activation("act", nn.GELU()), shell_activation("act", nn.PReLU())
    (True, False)
    """
    return (is_activation_module(module) and not any(True for _ in module.parameters())
            and not any(True for _ in module.buffers()))
