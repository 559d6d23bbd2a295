"""What :class:`passes.depth_tracer._DepthTracer` answers of a traced value that torch.fx does
not (:class:`ExampleAnswers`, a mixin of the tracer): how many items it holds (a ``chunk``, a
shape: the rank in the example call), the keys of a ``**kwargs`` argument, a condition on ranks,
and a condition whose other branch only raises. docs/capture.md ("What a trace reads from the example inputs") lists them.
"""
from __future__ import annotations

import contextlib
import operator
import os
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .example_values import ExampleValues, NoValue, rank_only, rank_inputs, shape_of
from .raise_branches import raise_is_caught, surviving_value, user_frame

__all__ = ["Example", "ExampleAnswers"]

Example = Callable[[], "tuple[tuple, dict] | None"]

#: the files between a traced forward and the tracer's ``to_bool``
_TRACING_FILES = (os.path.join("fx", "proxy.py"), os.path.join("passes", "depth_tracer.py"),
                  os.path.join("passes", "example_answers.py"))
#: code whose try blocks do not catch what a traced forward raises (torch's, and this tracer's,
#: which names the module that raised and raises again)
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _trace_frame(frame) -> bool:
    """Is ``frame`` torch.fx's ``Tracer.trace``, the outermost frame of a trace?"""
    return frame.f_code.co_name == "trace" and frame.f_code.co_filename.endswith("_symbolic_trace.py")


class ExampleAnswers:
    """Answers for an ``fx.Tracer`` subclass. ``example()`` gives the traced module's
    ``(args, kwargs)`` in one example call (None: there is none; then only what needs no example
    is answered). The tracer calls :meth:`start_answers` / :meth:`end_answers` around a trace."""

    def init_answers(self, example: Example | None) -> None:
        self._example = example
        self.values: ExampleValues | None = None
        self.evaluating = False  # ExampleValues is running nodes: module calls and attributes act as usual
        self.ranks: dict[fx.Node, int] = {}  # tensors whose rank the trace took from the example
        self.var_keys: tuple[str, ...] | None = None  # the **kwargs keys taken from the example

    def start_answers(self, root) -> None:
        if self._example is not None and isinstance(root, nn.Module):
            self.values = ExampleValues(self, root, self._example)

    def end_answers(self) -> None:
        if self.values is not None:
            self.values.close()

    def answer_bool(self, obj: fx.Proxy, otherwise: Callable[[], bool]) -> bool:
        """The truth of ``obj`` where it can be told, else ``otherwise()`` (torch.fx's, which raises)."""
        frame = user_frame(_TRACING_FILES)
        survives = surviving_value(frame) if frame is not None else None
        if survives is not None and not raise_is_caught(frame, _LIBRARY_DIRS, _trace_frame):
            # `assert n <= self.max_len` / `if h % 32: raise ...`: the graph goes on the way the
            # forward does not raise, and checks the condition when it runs
            path = frame.f_code.co_filename
            where = f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{frame.f_lineno}"
            # `== False`, not `not`: a graph is traced again when it is unpickled, and `not` asks
            # the proxy for a bool
            cond = obj if survives else self.create_proxy("call_function", operator.eq, (obj, False), {})
            self.create_proxy("call_function", torch._assert, (cond, f"sparsify: the module's own forward raises at "
                              f"{where} for this call (its graph checks that condition)"), {})
            return survives
        if rank_only(obj.node):  # `if x.ndim == 4:`
            return bool(self.rank_value(obj.node, otherwise))
        return otherwise()

    def rank_value(self, node: fx.Node, otherwise: Callable):
        """The example value of ``node``, a function of tensor ranks only; each rank it reads
        becomes an assertion in the graph. Without example values, ``otherwise()``."""
        ranks = [self.rank_of(t) for t in rank_inputs(node)]
        if None in ranks:
            return otherwise()
        try:
            return self.values(node)
        except NoValue:
            return otherwise()

    def rank_of(self, tensor: fx.Node) -> int | None:
        """The rank of ``tensor`` in the example call (None if unknown), asserted in the graph: a
        later call with another rank fails loudly there (a module's CallGuard sends inputs of
        another rank to its own forward before that)."""
        if tensor in self.ranks:
            return self.ranks[tensor]
        try:
            rank = self.values(tensor).dim() if self.values is not None else None
        except (NoValue, AttributeError, TypeError):
            rank = None
        if not isinstance(rank, int):
            return None
        self.ranks[tensor] = rank
        ndim = self.create_proxy("call_method", "dim", (fx.Proxy(tensor, self),), {})
        same = self.create_proxy("call_function", operator.eq, (ndim, rank), {})
        self.create_proxy("call_function", torch._assert, (same, f"sparsify: {tensor.name} was {rank}-dimensional "
                          "in example_inputs when this graph was traced, and the graph holds that rank"), {})
        return rank

    def keys(self, obj):
        # `self.fn(x, **kwargs)` in a module traced on its own (vit-pytorch's CaiT wrappers): the
        # keys the example call passed with a value; the CallGuard takes calls with those only
        node = obj.node
        if node.op == "placeholder" and str(node.target).startswith("**") and self.values is not None:
            try:
                given = self.values(node)
            except NoValue:
                given = None
            if isinstance(given, dict):
                self.var_keys = tuple(k for k, v in given.items() if v is not None)
                return list(self.var_keys)
        return super().keys(obj)

    def iter(self, obj):
        # ``map(f, x.chunk(3, -1))`` (lucidrains' attention): the pieces of a chunk are known
        # without the shape; a dimension too small for them fails loudly when the graph runs
        n = self.length(obj.node)
        return iter([obj[i] for i in range(n)]) if n is not None else super().iter(obj)

    def length(self, node: fx.Node) -> int | None:
        """How many items ``node`` holds, where the trace can tell: the pieces of a ``chunk``, a
        shape (``*x.shape``: the rank in the example call) or a slice of one (``*x.shape[-2:]``)."""
        n = _chunks(node)
        if n is not None:
            return n
        sliced = node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice)
        whole = node.args[0] if sliced and isinstance(node.args[0], fx.Node) else node
        tensor = shape_of(whole)
        rank = self.rank_of(tensor) if tensor is not None else None
        if rank is None:
            return None
        return len(range(rank)[node.args[1]]) if sliced else rank

    @contextlib.contextmanager
    def evaluating_examples(self) -> Iterator[None]:
        """While :class:`ExampleValues` runs nodes: modules hold their real mode flags, and the
        patched ``Module.__call__`` / ``__getattr__`` call and return as they would untraced."""
        saved = getattr(self, "_saved", [])  # (module, flag, real value) of the mode flags
        proxies = [(m, flag, m.__dict__.get(flag)) for m, flag, _ in saved]
        outer, self.evaluating = self.evaluating, True
        for m, flag, value in saved:
            m.__dict__[flag] = value
        try:
            yield
        finally:
            self.evaluating = outer
            for m, flag, proxy in proxies:
                m.__dict__[flag] = proxy

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)


def _chunks(node: fx.Node) -> int | None:
    """How many pieces ``node`` (a ``chunk`` call with a constant count) returns, else None."""
    if node.target not in ("chunk", torch.chunk) or node.op not in ("call_method", "call_function"):
        return None
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    return n if isinstance(n, int) and n > 0 else None
