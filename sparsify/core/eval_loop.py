"""The forward passes behind the counting tools (``measure``, ``activation_stats``, the MAC
counter): a model run in eval mode over batches while hooks record what they see, and left in the
mode it came in with its hooks removed, also when a forward fails."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from passes import kept_state

from sparsify.core.modes import kept_modes

__all__ = ["run_eval", "internal", "in_internal", "samples_in"]

_DEPTH = [0]


def samples_in(inputs) -> int:
    """The samples in one call's positional inputs: the first batched tensor's length, or the length
    of a list of unbatched samples (a torchvision detector's list of ``(C, H, W)`` images).

    >>> samples_in((torch.zeros(4, 3, 8, 8),)), samples_in(([torch.zeros(3, 8, 8), torch.zeros(3, 6, 9)],))
    (4, 2)
    >>> samples_in(([torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 2, 2)],))  # feature levels of one batch
    2
    """
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
        if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
            # (C, H, W) images or (L, F) sequences, one per sample; 4-D and up are batches per item
            return len(x) if x[0].dim() <= 3 else int(x[0].shape[0])
    return 1


@contextlib.contextmanager
def internal():
    """Forwards the library runs for itself (finalize's check, ``measure``, the MAC count): not
    the user's evaluation, whose measured activation sparsity the report shows.

    >>> with internal():
    ...     in_internal()
    True
    >>> in_internal()
    False
    """
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def in_internal() -> bool:
    """Whether a forward runs inside :func:`internal`."""
    return _DEPTH[0] > 0


def run_eval(model: nn.Module, batches: Iterable, input_fn: Callable, max_batches: int | None, handles,
             context: Callable[[], contextlib.AbstractContextManager] | None = None) -> int:
    """Run ``model`` in eval mode on ``input_fn(batch)`` for each of at most ``max_batches``
    batches, then put back its mode, its buffers and the random generators and remove the hook
    ``handles`` (also on an error). Returns the samples seen: per batch, the first dimension of
    its first non-scalar input tensor, else 1.
    ``context()``, when given, is entered around each batch's forward.

    >>> net = nn.Linear(2, 1).train()
    >>> run_eval(net, [torch.zeros(3, 2), torch.zeros(4, 2)], lambda b: (b,), None, []), net.training
    (7, True)
    """
    samples = 0
    try:
        # what the forwards change is put back: an observer or fake-quantizer (QAT) updates its
        # statistics in eval mode too, and counting changes nothing in the model
        with kept_modes(model, training=False), kept_state(model):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = input_fn(batch)
                samples += samples_in(inputs)
                with internal(), (context() if context is not None else contextlib.nullcontext()):
                    model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return samples
