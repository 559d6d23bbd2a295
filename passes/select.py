"""Naming and selecting graph nodes: qualified names, full-match globs on them (linear time),
and predicates ``(node, module_or_None) -> bool`` on convolution shapes."""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable

import torch.fx as fx
from torch import nn

__all__ = ["Predicate", "node_name", "target_module", "is_grouped", "is_depthwise", "kernel_size_in", "Glob",
           "compile_glob"]

Predicate = Callable[[fx.Node, "nn.Module | None"], bool]


def target_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else ``None``: the second argument of a
    :data:`Predicate`.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> [target_module(gm, n) for n in gm.graph.nodes]
    [None, ReLU(), None]
    """
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def node_name(node: fx.Node, prefix: str = "") -> str:
    """The name rules match against: the module's qualified name for ``call_module`` nodes,
    the graph node's name otherwise; ``prefix`` is the path of the graph's own module.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> node_name(list(gm.graph.nodes)[1], "head")
    'head.0'
    """
    name = str(node.target) if node.op == "call_module" else node.name
    return f"{prefix}.{name}" if prefix else name


def is_grouped(node: fx.Node, mod: nn.Module | None) -> bool:
    """Convolutions with ``groups > 1`` (depthwise included); ``node`` is not read.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2)))
    >>> [n.target for n in gm.graph.nodes if is_grouped(n, target_module(gm, n))]
    ['1']
    """
    return getattr(mod, "groups", 1) > 1


def is_depthwise(node: fx.Node, mod: nn.Module | None) -> bool:
    """Convolutions with one input channel per group (``groups == in_channels > 1``), whatever
    their output channels; ``node`` is not read.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 16, 3, groups=8)))
    >>> [(n.target, is_depthwise(n, target_module(gm, n))) for n in gm.graph.nodes if n.op == "call_module"]
    [('0', False), ('1', True)]
    """
    g = getattr(mod, "groups", 1)
    return g > 1 and g == getattr(mod, "in_channels", -1)


def kernel_size_in(sizes: Iterable[int]) -> Predicate:
    """A :data:`Predicate`: modules with a kernel (convolutions, pooling) whose (square or not)
    kernel's largest side is in ``sizes``; never Linear (modules without ``kernel_size``).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, (1, 3)), nn.MaxPool2d(3),
    ...                                            nn.Flatten(), nn.LazyLinear(2)))
    >>> is_3 = kernel_size_in([3])
    >>> [n.target for n in gm.graph.nodes if is_3(n, target_module(gm, n))]
    ['1', '2']
    """
    sizes = set(sizes)
    return lambda node, mod: hasattr(mod, "kernel_size") and _largest(mod.kernel_size) in sizes


def _largest(kernel_size) -> int:
    # a pooling layer keeps the int it was given (nn.MaxPool2d(3)); convolutions keep tuples
    return kernel_size if isinstance(kernel_size, int) else max(kernel_size)


class Glob:
    """A compiled full-match glob (see :func:`compile_glob`); ``fullmatch(name)`` is True or False.

    Matching simulates the pattern as a set of positions over the name (Thompson's construction),
    so it costs O(len(pattern) * len(name)) whatever the pattern: a regex translation backtracks
    exponentially on patterns with many ``*``.
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        # ("lit", c) | ("any",) one non-dot | ("star",) non-dots | ("dstar",) anything | ("cls", regex)
        # | ("skip",) before a whole-component dstar: reads nothing
        tokens = []
        parts = re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern)
        for k, p in enumerate(parts):
            if p == "**":
                # a whole component ("**.conv1", "a.**.b") also stands for no component, as gitignore's
                # "**/": "skip" lets the match pass it and the dot after it before it reads anything
                if parts[k + 1].startswith(".") and (not tokens or tokens[-1] == ("lit", ".")):
                    tokens.append(("skip", None))
                tokens.append(("dstar", None))
            elif p == "*":
                tokens.append(("star", None))
            elif p == "?":
                tokens.append(("any", None))
            elif p.startswith("[") and p.endswith("]") and len(p) > 2:
                # fnmatch's translation of one character class matches exactly one character
                tokens.append(("cls", re.compile(fnmatch.translate(p)[4:-3])))
            else:
                tokens.extend(("lit", ch) for ch in p)
        self._tokens = tokens

    def _closure(self, states: set[int]) -> set[int]:
        # a star may match nothing: being before it means being after it too
        todo, seen = list(states), set(states)
        while todo:
            i = todo.pop()
            if i >= len(self._tokens) or self._tokens[i][0] not in ("star", "dstar", "skip"):
                continue
            for j in (i + 1, i + 3) if self._tokens[i][0] == "skip" else (i + 1,):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    def fullmatch(self, name: str) -> bool:
        toks = self._tokens
        states = self._closure({0})
        for ch in name:
            nxt = set()
            for i in states:
                if i == len(toks):
                    continue
                kind, arg = toks[i]
                if kind == "lit":
                    if ch == arg:
                        nxt.add(i + 1)
                elif kind == "any":
                    if ch != ".":
                        nxt.add(i + 1)
                elif kind == "cls":
                    if arg.fullmatch(ch):
                        nxt.add(i + 1)
                elif kind == "star":
                    if ch != ".":
                        nxt.add(i)
                elif kind == "dstar":
                    nxt.add(i)
            if not nxt:
                return False
            states = self._closure(nxt)
        return len(toks) in states

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"


def compile_glob(pattern: str) -> Glob:
    """A full-match glob: ``*`` matches within one dotted component, ``**`` across components (a
    whole component ``**`` also matches none: ``**.conv1`` matches ``conv1``, ``a.**.b`` ``a.b``),
    ``?`` one character of a component, ``[...]`` a character class. Linear in the name's length.

    >>> compile_glob("layer1.*.conv1").fullmatch("layer1.0.conv1")
    True
    >>> compile_glob("layer*").fullmatch("layer1.0.conv1")
    False
    >>> compile_glob("layer**").fullmatch("layer1.0.conv1")
    True
    >>> [compile_glob("**.conv1").fullmatch(n) for n in ("conv1", "layer1.0.conv1", "xconv1")]
    [True, True, False]
    """
    return Glob(pattern)
