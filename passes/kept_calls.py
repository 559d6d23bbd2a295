"""Functions that a rewrite calls in a graph on one of its modules (a ``get_attr`` node of a
layer) and that every later trace of the graph's code must keep as that one call.

torch.fx does not pickle a graph: ``torch.load`` runs its generated code under a tracer again. A
function given a module there gets the module itself, not a traced value, so ``torch.fx.wrap``
(which records a call only when an argument is traced) runs its body, whose reads of the
module's parameters are traced values: a branch on them fails the load. While a
:class:`passes.depth_tracer._DepthTracer` traces, :func:`kept_calls` puts a recording stand-in
in the place of each function :func:`kept_call` registered, in the globals of the code traced.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

__all__ = ["kept_call", "kept_calls"]

_KEPT: list[Callable] = []


def kept_call(fn: Callable) -> Callable:
    """Register ``fn`` (a decorator): a trace of code calling it records one ``call_function``
    node, its module arguments becoming ``get_attr`` nodes.

    >>> @kept_call
    ... def weight_of(layer):
    ...     return layer.weight
    >>> weight_of(nn.Linear(2, 3)).shape
    torch.Size([3, 2])
    """
    if not any(f is fn for f in _KEPT):
        _KEPT.append(fn)
    return fn


@contextlib.contextmanager
def kept_calls(tracer, root) -> Iterator[None]:
    """While ``tracer`` traces ``root`` (a module or a function), its code's registered functions
    record their call in ``tracer``'s graph instead of running."""
    fn = type(root).forward if isinstance(root, nn.Module) else root
    scope = getattr(fn, "__globals__", None)
    saved = {name: value for name, value in (scope or {}).items() if any(value is f for f in _KEPT)}
    for name, value in saved.items():
        scope[name] = _recording(tracer, value)
    try:
        yield
    finally:
        if scope is not None:
            scope.update(saved)


def _recording(tracer, fn: Callable) -> Callable:
    def record(*args, **kwargs):
        return tracer.create_proxy("call_function", fn, args, kwargs)
    return record
