"""What a traced forward may ask of a proxy beyond what ``torch.fx`` answers, for the span of one
trace by :class:`passes.depth_tracer._DepthTracer`:

* ``torch.finfo(x.dtype)`` / ``torch.iinfo(x.dtype)`` become graph nodes (x-transformers'
  ``-torch.finfo(sim.dtype).max`` mask value), so the graph reads the dtype each call has: under
  autocast that is another one than at trace time;
* ``len(x.shape)`` is answered with the rank of ``x`` in the example call
  (:meth:`_DepthTracer.rank_of`), asserted in the graph, and ``len`` of a ``chunk`` with its
  count (``(q, *kv.chunk(2))`` asks for it);
* ``callable(x)`` of a traced value is False (a proxy defines ``__call__`` for method calls such
  as ``x.relu()``): lucidrains' ``default(context, x)`` returns ``x() if callable(x) else x``, and
  a graph would call the tensor.
"""
from __future__ import annotations

import builtins
import contextlib
from typing import Iterator

import torch
import torch.fx as fx


__all__ = ["symbolic_type_info", "rank_reads", "values_not_callable"]

_TYPE_INFO = ("finfo", "iinfo")


@contextlib.contextmanager
def symbolic_type_info(tracer) -> Iterator[None]:
    """``torch.finfo`` / ``torch.iinfo`` of a proxy become ``call_function`` nodes of ``tracer``.

    >>> t = fx.Tracer(); t.graph = fx.Graph()
    >>> x = t.create_proxy("placeholder", "x", (), {})
    >>> with symbolic_type_info(t):
    ...     eps = torch.finfo(x.dtype).eps
    >>> [n.target for n in t.graph.nodes][1:], torch.finfo(torch.float16).bits
    ([<built-in function getattr>, <class 'torch.finfo'>], 16)
    """
    originals = {name: getattr(torch, name) for name in _TYPE_INFO}

    def symbolic(original):
        def info(*args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                return tracer.create_proxy("call_function", original, args, kwargs)
            return original(*args, **kwargs)
        return info
    for name, original in originals.items():
        setattr(torch, name, symbolic(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


@contextlib.contextmanager
def rank_reads(tracer) -> Iterator[None]:
    """``len()`` of a proxy asks ``tracer.length`` (a shape, a chunk); where it cannot tell, ``len``
    fails as in torch.fx.
    (``__index__`` is left alone: torch's argument parser would take every proxy for an int.)"""
    length = fx.Proxy.__dict__["__len__"]

    def __len__(self):
        n = tracer.length(self.node) if self.tracer is tracer else None
        return n if n is not None else length(self)
    fx.Proxy.__len__ = __len__
    try:
        yield
    finally:
        fx.Proxy.__len__ = length


@contextlib.contextmanager
def values_not_callable() -> Iterator[None]:
    """``callable()`` says False of a proxy of a value (not of an attribute: ``x.relu``).

    >>> x = fx.Proxy(fx.Graph().placeholder("x"))
    >>> with values_not_callable():
    ...     callable(x), callable(x.relu), callable(len)
    (False, True, True)
    """
    original = builtins.callable
    builtins.callable = lambda obj: (not isinstance(obj, fx.Proxy) or isinstance(obj, fx.proxy.Attribute)) and original(obj)
    try:
        yield
    finally:
        builtins.callable = original
