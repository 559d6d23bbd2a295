"""Activation regularizers (Transformed-ℓ1, ℓ1, Hoyer-square): the method in ``method.py``, the
penalty kernels (custom autograd functions) in ``kernels.py``. See docs/methods/tl1.md."""
from __future__ import annotations

from sparsify.methods.regularizers.method import (ACTIVATION_OPS, ACTIVATION_TYPES, ActivationL1Method,
                                                   ActivationRegGroup, ActivationRegularizer, HoyerSquareMethod,
                                                   TL1Method, penalty_value, produces_nonnegative, tl1, tl1_grad)

__all__ = ["tl1", "tl1_grad", "ActivationRegularizer", "ActivationRegGroup", "TL1Method",
           "ActivationL1Method", "HoyerSquareMethod", "penalty_value", "produces_nonnegative",
           "ACTIVATION_TYPES", "ACTIVATION_OPS"]
