"""Code of other libraries that a trace keeps whole: einops, which lucidrains' models
(vit-pytorch, x-transformers, ...) call everywhere. Its functions dispatch on the type of their
tensor argument, which a torch.fx proxy is not ("Tensor type unknown to einops"), so a forward
calling ``rearrange`` could not be traced and every such module ran its own forward. Its layers
(``Rearrange``, ``Reduce``) become leaves and its functions single graph calls, made on real
tensors when the graph runs. Neither holds a Conv/Linear layer or an activation a rule matches.
"""
from __future__ import annotations

import sys

from torch import nn

__all__ = ["library_leaf", "library_functions"]

_EINOPS_FUNCTIONS = ("rearrange", "repeat", "reduce", "einsum", "pack", "unpack")


def library_leaf(m: nn.Module) -> bool:
    """Is ``m`` a module of such a library (an einops layer)?

    >>> library_leaf(nn.ReLU())
    False
    """
    return type(m).__module__.startswith("einops.layers")


def library_functions() -> tuple:
    """The functions a trace records as single calls: einops' own, once the model imported it."""
    einops = sys.modules.get("einops")
    if einops is None:
        return ()
    return tuple(f for f in (getattr(einops, name, None) for name in _EINOPS_FUNCTIONS) if callable(f))
