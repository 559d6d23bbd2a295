"""Which sparse layers a forward with gradients ran through since the last ``sparsify.step``.

A model that ``sparsify`` returns shares its parameters with the model it was given. A loop that
keeps forwarding the given model (``sparse = sparsify(model, ...)``, then ``loss = f(model(x))``)
trains the shared weights while the masks and thresholds progress on the sparse model that no
loss ever sees, and nothing fails: ``sparsify.step`` asks these flags whether the sparse layers
took part in the steps the optimizer took (:func:`sparsify.core.pace.check_bypassed`).

The flag is a store into a list the layer holds: under ``torch.compile`` it is replayed after the
graph, with no recompilation (a counter would be read, guarded on and recompiled at every value).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["note_forward", "forwarded"]


def note_forward(layer: nn.Module) -> None:
    """Mark ``layer`` as run by a forward with gradients (a loss can reach its output).

    >>> layer = nn.Linear(1, 1)
    >>> note_forward(layer); forwarded([layer])
    True
    >>> with torch.no_grad():
    ...     note_forward(layer)
    >>> forwarded([layer])   # read once: the flags start over
    False
    """
    if torch.is_grad_enabled():
        box = layer.__dict__.get("_forwarded")
        if box is None:
            layer.__dict__["_forwarded"] = [True]
        else:
            box[0] = True


def forwarded(layers: Iterable[nn.Module]) -> bool:
    """Whether any of ``layers`` ran a forward with gradients since the last call; clears them.

    The flag is a one-element list made here, in the layer itself: shallow copies of the layer
    (``nn.DataParallel``'s replicas, made at every forward) share it, as they share its
    ``records``.

    >>> layers = [nn.Linear(1, 1), nn.Linear(1, 1)]
    >>> forwarded(layers)                       # makes the flags
    False
    >>> replica = layers[1]._replicate_for_data_parallel()
    >>> note_forward(replica); forwarded(layers)
    True
    """
    ran = False
    for layer in layers:
        box = layer.__dict__.get("_forwarded")
        if box is None:
            layer.__dict__["_forwarded"] = [False]
        else:
            ran |= box[0]
            box[0] = False
    return ran
