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

from sparsify.core.buffers import eager
from sparsify.core.retrace import refuse_retrace
from sparsify.core.sharded import is_distributed

__all__ = ["entered", "note_forward", "forwarded", "forwarded_yet", "watch_forwards", "entered_hook"]


def entered(layer: nn.Module, x) -> None:
    """What every forward of a sparse layer or inserted module does first: refuse another torch.fx
    tracer's value (:func:`~sparsify.core.retrace.refuse_retrace`), then :func:`note_forward`.

    >>> layer = nn.Linear(1, 1)
    >>> entered(layer, torch.ones(1)); forwarded([layer])
    True
    """
    refuse_retrace(x)
    note_forward(layer)


def entered_hook(module: nn.Module, args) -> None:
    """:func:`entered` as a forward pre-hook (:func:`watch_forwards`)."""
    entered(module, args[0] if args else None)


def watch_forwards(module: nn.Module) -> None:
    """Make ``module``, a group member, run :func:`entered` in every call: the modules of the
    library call it in their forward (their class says ``calls_entered = True``); a method's own
    module or a plain layer a method keeps gets it as a forward pre-hook, so another tracer is
    refused there too and ``sparsify.step`` sees its forwards. ``sparsify.finalize`` removes it.

    >>> layer = nn.Linear(1, 1)
    >>> watch_forwards(layer); _ = layer(torch.ones(1)); forwarded([layer])
    True
    """
    if not getattr(type(module), "calls_entered", False) and entered_hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(entered_hook)


def _flag(layer: nn.Module) -> list[bool]:
    """The layer's one-element flag list, made on first use. Shallow copies of the layer
    (``nn.DataParallel``'s replicas, made at every forward) share it, as they share its ``records``."""
    box = layer.__dict__.get("_forwarded")
    if box is None:
        box = layer.__dict__["_forwarded"] = [False]
    return box


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
        box = _flag(layer)
        if box[0] and is_distributed() and eager():
            # a second training forward without a sparsify.step between (gradient accumulation, or
            # a rank that missed a step): DDP's buffer broadcast before it may have written rank 0's
            # masks and thresholds without bumping the version counters the layer's caches go by
            drop = getattr(layer, "drop_caches", None)
            if drop is not None:
                drop()
        box[0] = True


def forwarded_yet(layers: Iterable[nn.Module]) -> bool:
    """Whether any of ``layers`` ran a forward with gradients since :func:`forwarded` last looked,
    leaving the flags as they are.

    >>> layer = nn.Linear(1, 1)
    >>> note_forward(layer); forwarded_yet([layer]), forwarded_yet([layer])
    (True, True)
    """
    return any(layer.__dict__.get("_forwarded", (False,))[0] for layer in layers)


def forwarded(layers: Iterable[nn.Module]) -> bool:
    """Whether any of ``layers`` ran a forward with gradients since the last call; clears them
    (and makes the flags of layers that have none, so that replicas made later share them).

    >>> layers = [nn.Linear(1, 1), nn.Linear(1, 1)]
    >>> forwarded(layers)                       # makes the flags
    False
    >>> replica = layers[1]._replicate_for_data_parallel()
    >>> note_forward(replica); forwarded(layers)
    True
    """
    ran = False
    for layer in layers:
        box = _flag(layer)
        ran |= box[0]
        box[0] = False
    return ran
