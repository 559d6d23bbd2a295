"""Train/eval modes kept per submodule.

``model.train(flag)`` sets the whole tree, so code that switches a model to eval for a forward and
back with ``model.train(was_training)`` turns a BatchNorm the user froze (``bn.eval()`` inside a
training model, the usual fine-tuning setup) back to training, and its running statistics move
again. Everything here restores each submodule's own mode, by name, so a module replaced during a
rewrite gets its predecessor's mode.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["kept_modes", "modes_of", "restore_modes"]


def modes_of(model: nn.Module) -> dict[str, bool]:
    """``{qualified name: training}`` of every submodule (the root under ``""``)."""
    return {name: m.training for name, m in model.named_modules(remove_duplicate=False)}


def restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Give ``model``'s submodules the modes ``modes`` recorded; one it does not name (inserted
    since) takes its parent's.

    >>> net = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)).train()
    >>> saved = modes_of(net[1].eval() and net)
    >>> restore_modes(net.train(), saved)
    >>> net.training, net[1].training
    (True, False)
    """
    now: dict[str, bool] = {}
    for name, m in model.named_modules(remove_duplicate=False):  # parents come before their children
        if name in modes:
            m.training = modes[name]
        elif name:
            m.training = now.get(name.rpartition(".")[0], m.training)
        now[name] = m.training


@contextlib.contextmanager
def kept_modes(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """Run the block with ``model`` put in ``training`` mode (``None``: as it is), then give every
    submodule its own mode back (also on an error).

    >>> net = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)).train()
    >>> _ = net[1].eval()
    >>> with kept_modes(net, training=False):
    ...     net[0].training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    modes = modes_of(model)
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        restore_modes(model, modes)
