"""The values a graph's nodes take on one example call, computed while the graph is still being
traced (:class:`ExampleValues`), and which of them only read a tensor's rank (:func:`rank_only`).

``torch.fx`` cannot answer ``len(x.shape)``, ``b, n, _, h = *x.shape, self.heads`` or ``if
x.ndim == 4:``: a proxy has no rank. A module's input rank hardly ever changes from call to call,
so :mod:`passes.depth_tracer` answers these from the example inputs (the rank of the tensor
there), records the rank in the graph (an assertion) and in the module's
:class:`passes.calls.CallGuard` (a call with inputs of another rank runs the module's own
forward). Shape *values* (``if h % 7:``) and tensor data are never taken from the example: a
graph specialised to them would compute something else for the next batch.
"""
from __future__ import annotations

import builtins
import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

__all__ = ["ExampleValues", "NoValue", "rank_only", "rank_read", "rank_inputs", "shape_of"]


class NoValue(Exception):
    """The example value of a node cannot be worked out (no example, or running it failed)."""


#: node forms that read a tensor's rank: ``x.dim()``, ``x.ndim``
_RANK_METHODS = {"dim", "ndimension"}
#: operations on ranks that keep the result a function of ranks only
_RANK_OPS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.add,
             operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg, operator.not_, builtins.len}


def shape_of(node: fx.Node) -> fx.Node | None:
    """The tensor node whose whole shape ``node`` reads (``x.shape``, ``x.size()``), else None.

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> shape_of(g.call_method("size", (x,))) is x, shape_of(g.call_method("size", (x, 0)))
    (True, None)
    """
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1:] == ("shape",):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def rank_read(node: fx.Node) -> fx.Node | None:
    """The tensor node whose rank ``node`` reads itself (``x.dim()``, ``x.ndim``,
    ``len(x.shape)``), else None.

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> rank_read(g.call_method("dim", (x,))) is x, rank_read(g.call_method("size", (x,)))
    (True, None)
    """
    if node.op == "call_method" and node.target in _RANK_METHODS and len(node.args) == 1:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1:] == ("ndim",):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target is builtins.len and isinstance(node.args[0], fx.Node):
        return shape_of(node.args[0])
    return None


def rank_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors whose ranks ``node`` (a :func:`rank_only` node) reads."""
    read = rank_read(node)
    return [read] if read is not None else [t for a in node.all_input_nodes for t in rank_inputs(a)]


def rank_only(node: fx.Node) -> bool:
    """Is ``node`` a function of tensor ranks alone (``x.ndim == 4``, ``x.dim() - 2``)?

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> four = g.call_function(operator.eq, (g.call_method("dim", (x,)), 4))
    >>> rank_only(four), rank_only(g.call_function(operator.eq, (g.call_method("size", (x, 0)), 4)))
    (True, False)
    """
    if rank_read(node) is not None:
        return True
    if node.op == "call_function" and node.target in _RANK_OPS:
        inputs = [a for a in (*node.args, *node.kwargs.values())]
        return (any(isinstance(a, fx.Node) for a in inputs)
                and all(rank_only(a) if isinstance(a, fx.Node) else isinstance(a, (int, bool)) for a in inputs))
    return False


class ExampleValues:
    """Lazily computes, for nodes of a graph ``tracer`` is building, their values on the example
    call ``inputs()`` (``(args, kwargs)`` of the traced module, or None when there is none).

    Only the nodes a question needs are run, each once, without gradients; what running them
    changes (running statistics, random state) is put back by :meth:`close`. While a node runs,
    ``tracer.evaluating`` is set so that the tracer's patched ``Module.__call__`` and
    ``__getattr__`` act as usual, and the modules' mode flags hold their real values.
    """

    def __init__(self, tracer, root: nn.Module, inputs: Callable[[], tuple[tuple, dict] | None]):
        self._tracer, self._root, self._inputs = tracer, root, inputs
        self._values: dict[fx.Node, Any] = {}
        self._bound: dict[str, Any] | None = None
        self._state = None  # the kept_state context, entered at the first run

    def __call__(self, node: fx.Node) -> Any:
        stack = [(node, False)]
        while stack:  # a node after its inputs, without recursion (graphs run thousands deep)
            n, inputs_done = stack.pop()
            if n in self._values:
                continue
            if inputs_done:
                self._values[n] = self._run(n)
            else:
                stack.append((n, True))
                stack.extend((a, False) for a in n.all_input_nodes if a not in self._values)
        return self._values[node]

    def close(self) -> None:
        """Put back buffers and random generators as they were before the first run."""
        if self._state is not None:
            state, self._state = self._state, None
            with self._tracer.evaluating_examples():  # its no_grad is the library's own switch
                state.__exit__(None, None, None)
        self._values.clear()

    def _arguments(self) -> dict[str, Any]:
        if self._bound is None:
            # the inputs may come from a forward of the whole model run now (its no_grad, its
            # module calls are the library's own, not the traced forward's)
            with self._tracer.evaluating_examples():
                example = self._inputs()
            if example is None:
                raise NoValue("no example inputs")
            args, kwargs = example
            try:
                bound = inspect.signature(type(self._root).forward).bind(self._root, *args, **kwargs)
            except (TypeError, ValueError) as exc:
                raise NoValue(str(exc)) from None
            bound.apply_defaults()
            self._bound = dict(bound.arguments)
        return self._bound

    def _run(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            arguments = self._arguments()
            name = str(n.target).lstrip("*")
            base, _, count = name.rpartition("_")
            for key in (name, base if count.isdigit() else None):
                if key in arguments:
                    return arguments[key]
            raise NoValue(f"no example value for argument {n.target}")
        mode = self._tracer.modes.get(n)
        if mode is not None:
            return mode[1]
        if self._state is None:
            from .reproduce import kept_state
            self._state = kept_state(self._root)
            self._state.__enter__()
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self._values.__getitem__)
        try:
            # evaluating first: the no_grad switch is the library's own, not the traced forward's
            with self._tracer.evaluating_examples(), torch.no_grad():
                if n.op == "get_attr":
                    value = self._root
                    for part in str(n.target).split("."):
                        value = getattr(value, part)
                    return value
                if n.op == "call_module":
                    return self._root.get_submodule(str(n.target))(*args, **kwargs)
                if n.op == "call_method":
                    return getattr(args[0], str(n.target))(*args[1:], **kwargs)
                if n.op == "call_function":
                    return n.target(*args, **kwargs)
        except Exception as exc:
            raise NoValue(f"{n.format_node()}: {type(exc).__name__}: {exc}") from None
        raise NoValue(f"no example value for {n.op} nodes")
