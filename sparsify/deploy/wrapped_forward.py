"""A model whose ``forward`` another library replaced on the instance, finalized as its class.

HF accelerate's ``mixed_precision`` wraps the prepared model's ``forward`` in autocast on the
instance (``model.forward``, with the original kept as ``model._original_forward``), and
``accelerator.unwrap_model(model)`` keeps that wrapper unless ``keep_fp32_wrapper=False``. finalize
would then compare the sparse model's bfloat16 outputs with the finalized model's float32 ones (its
traced modules are the user's classes again, without the wrapper) and blame the rounding on the
layers it changed. The finalized model is for deployment, where the caller picks the precision:
finalize runs the class's own forward, with the wrapper set aside for the duration.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["class_forward"]


@contextlib.contextmanager
def class_forward(model: nn.Module) -> Iterator[None]:
    """``model`` without accelerate's instance-level ``forward`` wrapper inside the block.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> lin._original_forward, lin.forward = lin.forward, lambda x: "wrapped"
    >>> with class_forward(lin):
    ...     type(lin(torch.zeros(2))).__name__
    'Tensor'
    >>> lin(torch.zeros(2))
    'wrapped'
    """
    held = model.__dict__
    if "forward" not in held or "_original_forward" not in held:
        yield
        return
    saved = {k: held.pop(k) for k in ("forward", "_original_forward")}
    try:
        yield
    finally:
        held.update(saved)
