"""Keep activation checkpointing out of traced graphs.

``torch.utils.checkpoint.checkpoint(fn, x)`` called during ``torch.fx`` tracing runs ``fn`` on the
proxies and leaves no node of its own: the graph computes the same values, but the recomputation
in backward, and the memory it saves, are gone without a word. While :func:`refuse_checkpoint` is
active, a call of ``checkpoint`` or ``checkpoint_sequential`` from the forward being traced raises
:class:`CheckpointInGraph`; the tracer then makes the calling module a leaf that runs its own
forward (a fallback, reported with this reason), which keeps the checkpointing.

The functions are found where code reaches them: names bound to them in the globals of imported
modules (``torch.utils.checkpoint`` itself, ``from torch.utils.checkpoint import checkpoint`` in a
model's module or in a helper such as timm's ``checkpoint_seq``) and of the functions of the traced
classes, and ``functools.partial`` objects stored on modules (transformers keeps
``self._gradient_checkpointing_func = partial(checkpoint, ...)``). They are restored on exit.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator

import torch.utils.checkpoint as cp
from torch import nn

__all__ = ["CheckpointInGraph", "refuse_checkpoint"]


class CheckpointInGraph(RuntimeError):
    """Raised while tracing by a call of ``torch.utils.checkpoint``."""


def _refuse(*args, **kwargs):
    raise CheckpointInGraph("calls torch.utils.checkpoint (activation checkpointing), which a traced graph "
                            "would drop: this module runs its own forward")


_TARGETS = (cp.checkpoint, cp.checkpoint_sequential)  # taken at import: refuse_checkpoint replaces them


def _is_checkpoint(value) -> bool:
    # type(), not isinstance(): isinstance reads __class__, which some module globals turn into a
    # deprecation warning (torch.distributed.reduce_op)
    return any(value is f for f in _TARGETS) or (type(value) is functools.partial
                                                  and any(value.func is f for f in _TARGETS))


_MODULES: dict = {"count": -1, "spaces": []}  # imported modules whose globals hold the functions


def _module_namespaces() -> list[dict]:
    """Globals of imported modules that hold the functions (``torch.utils.checkpoint`` itself,
    helpers such as timm's ``checkpoint_seq`` module, torch's ``checkpoint_wrapper``): one scan
    (about 25 ms) per change in the number of imported modules."""
    if _MODULES["count"] != len(sys.modules):
        found = []
        for mod in list(sys.modules.values()):
            space = getattr(mod, "__dict__", None)
            # _refuse too: a scan made while an outer refuse_checkpoint is active finds the same spaces
            if isinstance(space, dict) and any(v is _refuse or _is_checkpoint(v) for v in list(space.values())):
                found.append(space)
        _MODULES.update(count=len(sys.modules), spaces=found)
    return _MODULES["spaces"]


def _namespaces(root: nn.Module) -> dict[int, dict]:
    """The globals of every function defined by the classes of ``root``'s modules (they may live
    outside any imported module: a notebook, a doctest), and those of :func:`_module_namespaces`."""
    spaces = {id(cp.__dict__): cp.__dict__}
    spaces.update((id(g), g) for g in _module_namespaces())
    for cls in {type(m) for m in root.modules()}:
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch."):
                continue
            for value in vars(klass).values():
                g = getattr(value, "__globals__", None)
                if isinstance(g, dict):
                    spaces[id(g)] = g
    return spaces


@contextlib.contextmanager
def refuse_checkpoint(root: nn.Module) -> Iterator[None]:
    """While active, code traced from ``root`` that calls ``torch.utils.checkpoint`` raises
    :class:`CheckpointInGraph` (see the module docstring).

    >>> import torch
    >>> from torch.utils.checkpoint import checkpoint
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return checkpoint(self.lin, x, use_reentrant=False)
    >>> with refuse_checkpoint(Net()):
    ...     torch.fx.symbolic_trace(Net())
    Traceback (most recent call last):
    ...
    passes.checkpoint_guard.CheckpointInGraph: calls torch.utils.checkpoint (activation checkpointing), which a traced graph would drop: this module runs its own forward
    >>> len(torch.fx.symbolic_trace(Net()).graph.nodes)  # outside: traced through, checkpointing gone
    3
    """
    undo: list = []
    try:
        for space in _namespaces(root).values():
            for key, value in list(space.items()):
                if _is_checkpoint(value):
                    undo.append((space, key, value))
                    space[key] = _refuse
        for m in root.modules():
            for key, value in list(vars(m).items()):
                if _is_checkpoint(value):
                    undo.append((m.__dict__, key, value))
                    m.__dict__[key] = _refuse
        yield
    finally:
        for space, key, value in reversed(undo):
            space[key] = value
