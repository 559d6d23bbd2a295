"""The method registry: recipe method names -> :class:`~sparsify.core.contract.Method` objects.

Adding a method = one file in this folder + one line in ``_REGISTERED`` + a recipe.
"""
from __future__ import annotations

from sparsify.core.contract import Group, GroupContext, Method, Site
from sparsify.core.layers import SparseWeightMixin, plain_copy, specialize, weight_base
from sparsify.methods.st3 import ST3Method
from sparsify.methods.str import STRMethod
from sparsify.methods.magnitude import MagnitudeMethod
from sparsify.methods.nm import NMMethod
from sparsify.methods.regularizers import ActivationL1Method, HoyerSquareMethod, TL1Method
from sparsify.methods.semistructured import SemiStructuredMethod
from sparsify.methods.dual import L1PruneMethod
from sparsify.methods.sas import SASMethod

_REGISTERED: list[type[Method]] = [
    ST3Method,
    STRMethod,
    MagnitudeMethod,
    NMMethod,
    TL1Method, ActivationL1Method, HoyerSquareMethod,
    SemiStructuredMethod,
    L1PruneMethod,
    SASMethod,
]

REGISTRY: dict[str, Method] = {cls.name: cls() for cls in _REGISTERED}


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ``KeyError`` listing the known ones otherwise.

    >>> get_method("st3").name
    'st3'
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "get_method", "Method", "Group", "GroupContext", "Site", "SparseWeightMixin",
           "specialize", "plain_copy", "weight_base"]
