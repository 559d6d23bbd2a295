"""``finalize``'s inference targets beyond the plain model: ``accelerate`` (CPU sparse kernels) and
``semi_structured`` (2:4 sparse tensor cores on CUDA), which exclude each other.

Apart from :mod:`sparsify.api` because they rewrite what ``finalize_model`` returned, after the
check of the sparse model against it, and import their deploy modules only when asked for.
"""
from __future__ import annotations

import torch
from torch import nn

from passes.call_inputs import input_tuple
from sparsify.core.state import find_state, unwrap
from sparsify.prepare.inputs import refuse_misfit, state_inputs

__all__ = ["check_target", "for_target"]


def check_target(accelerate, semi_structured) -> None:
    """At most one inference target (checked before any work)."""
    if accelerate and semi_structured:
        raise ValueError("finalize: accelerate (CPU inference) and semi_structured (CUDA inference) "
                         "exclude each other: pass one")


def for_target(final: nn.Module, model: nn.Module, example_inputs, check: bool, accelerate,
               semi_structured) -> nn.Module:
    """``final``, the finalized ``model``, rewritten for the inference target ``finalize`` was given
    (``example_inputs``: as given to it, the accelerate paths' timing inputs when given)."""
    if semi_structured:
        from sparsify.deploy.semistructured24 import to_semi_structured
        if isinstance(semi_structured, torch.dtype):
            final = final.to(semi_structured)
        return to_semi_structured(final)
    if accelerate:
        from sparsify.deploy.accelerate import accelerate as _accelerate
        inputs = example_inputs if example_inputs is not None else state_inputs(find_state(model), unwrap(model))
        if inputs is None:
            raise ValueError("finalize(accelerate=True) builds and times layers on example inputs: pass "
                             "example_inputs=... here or to sparsify(...)")
        options = accelerate if isinstance(accelerate, dict) else {}
        try:
            final = _accelerate(final, inputs, **{"check": check, **options})
        except Exception as e:
            if example_inputs is not None and not check:  # the check would have said it: say so here
                refuse_misfit("finalize: example_inputs", final, input_tuple(example_inputs), e)
            raise
    return final
