"""The forward passes behind the counting tools (``measure``, ``activation_stats``, the MAC
counter): a model run in eval mode over batches while hooks record what they see, and left in the
mode it came in with its hooks removed, also when a forward fails."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable, Iterable

import torch
from torch import nn

from passes import kept_state

from sparsify.core.modes import kept_modes

__all__ = ["run_eval", "internal", "in_internal", "samples_in"]

_DEPTH = [0]


def samples_in(inputs) -> int:
    """The samples in one call's positional inputs: the leading dimension of the first batched
    tensor, looked for inside dicts, lists and tuples too (a tokenizer's dict, an ``(x, y)`` pair),
    else 1. A list or tuple of tensors is read by one rule, as the shapes cannot always tell: a
    4-D-and-up first item means batches per item (feature levels); a tuple, or items of mixed
    dimensions, whose leading dimensions agree is the parts of one batch; otherwise each item is a
    sample (a torchvision detector's list of ``(C, H, W)`` images, sequences of their own lengths).

    >>> samples_in((torch.zeros(4, 3, 8, 8),)), samples_in(([torch.zeros(3, 8, 8), torch.zeros(3, 6, 9)],))
    (4, 2)
    >>> samples_in(([torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 2, 2)],))  # feature levels of one batch
    2
    >>> samples_in(({"x": torch.zeros(3, 8), "y": torch.zeros(3, 4)},)), samples_in(((torch.zeros(6, 8), torch.zeros(6, 4)),))
    (3, 6)
    """
    for x in inputs:
        n = _batch_of(x)
        if n is not None:
            return n
    return 1


def _batch_of(x) -> int | None:
    """The samples one argument holds (see :func:`samples_in`); None when it holds no batched tensor."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, Mapping):  # named parts of one batch (a tokenizer's dict): its first batched value
        return next((n for n in map(_batch_of, x.values()) if n is not None), None)
    if not isinstance(x, (list, tuple)) or not x:
        return None
    if not all(isinstance(t, torch.Tensor) for t in x):
        return next((n for n in map(_batch_of, x) if n is not None), None)
    if x[0].dim() > 3:
        return int(x[0].shape[0])
    leading = {int(t.shape[0]) for t in x if t.dim() > 0}
    if (isinstance(x, tuple) or len({t.dim() for t in x}) > 1) and len(leading) == 1:
        return leading.pop()
    # a list of same-rank tensors is one sample per item: a detector's images need not share a size
    return len(x)


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
