"""Selecting graph nodes: by module type, functional op, qualified-name glob and predicates.

Every selector is a plain predicate ``(node, module_or_None) -> bool`` so they compose with
:func:`all_of` / :func:`any_of` / :func:`none_of`; :func:`select` applies one to a graph.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable

import torch.fx as fx
from torch import nn

__all__ = [
    "Predicate", "node_name", "target_module", "select", "by_type", "by_op", "by_name",
    "all_of", "any_of", "none_of", "is_grouped", "is_depthwise", "kernel_size_in",
    "channels_between", "glob_to_regex",
]

Predicate = Callable[[fx.Node, "nn.Module | None"], bool]


def target_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else ``None``."""
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


def select(gm: fx.GraphModule, predicate: Predicate) -> list[fx.Node]:
    """Nodes of ``gm`` (in graph order) for which ``predicate(node, module)`` holds.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> [n.target for n in select(gm, by_type(torch.nn.Linear))]
    ['0']
    """
    return [n for n in gm.graph.nodes if predicate(n, target_module(gm, n))]


def by_type(*types: type) -> Predicate:
    """``call_module`` nodes whose module is an instance of one of ``types``."""
    return lambda node, mod: mod is not None and isinstance(mod, types)


def by_op(*ops: Callable | str) -> Predicate:
    """``call_function`` / ``call_method`` nodes calling one of ``ops`` (functions or method names)."""
    fns = {op for op in ops if callable(op)}
    methods = {op for op in ops if isinstance(op, str)}
    return lambda node, mod: ((node.op == "call_function" and node.target in fns)
                              or (node.op == "call_method" and node.target in methods))


def glob_to_regex(pattern: str) -> re.Pattern:
    """A full-match glob: ``*`` matches within one dotted component, ``**`` across components.

    >>> bool(glob_to_regex("layer1.*.conv1").fullmatch("layer1.0.conv1"))
    True
    >>> bool(glob_to_regex("layer*").fullmatch("layer1.0.conv1"))
    False
    >>> bool(glob_to_regex("layer**").fullmatch("layer1.0.conv1"))
    True
    """
    parts = re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern)
    out = []
    for p in parts:
        if p == "**":
            out.append(".*")
        elif p == "*":
            out.append(r"[^.]*")
        elif p == "?":
            out.append(r"[^.]")
        elif p.startswith("[") and p.endswith("]") and len(p) > 2:
            out.append(fnmatch.translate(p)[4:-3])  # reuse fnmatch's class translation
        else:
            out.append(re.escape(p))
    return re.compile("".join(out))


def by_name(patterns: str | Iterable[str], prefix: str = "") -> Predicate:
    """Nodes whose :func:`node_name` fully matches one of the globs in ``patterns``."""
    if isinstance(patterns, str):
        patterns = [patterns]
    regexes = [glob_to_regex(p) for p in patterns]
    return lambda node, mod: any(r.fullmatch(node_name(node, prefix)) for r in regexes)


def all_of(*preds: Predicate) -> Predicate:
    return lambda node, mod: all(p(node, mod) for p in preds)


def any_of(*preds: Predicate) -> Predicate:
    return lambda node, mod: any(p(node, mod) for p in preds)


def none_of(*preds: Predicate) -> Predicate:
    return lambda node, mod: not any(p(node, mod) for p in preds)


def is_grouped(node: fx.Node, mod: nn.Module | None) -> bool:
    """Convolutions with ``groups > 1`` (depthwise included)."""
    return getattr(mod, "groups", 1) > 1


def is_depthwise(node: fx.Node, mod: nn.Module | None) -> bool:
    """Convolutions with one input channel per group (``groups == in_channels > 1``)."""
    g = getattr(mod, "groups", 1)
    return g > 1 and g == getattr(mod, "in_channels", -1)


def kernel_size_in(sizes: Iterable[int]) -> Predicate:
    """Convolutions whose (square or not) kernel's largest side is in ``sizes``; never Linear."""
    sizes = set(sizes)
    return lambda node, mod: (hasattr(mod, "kernel_size") and max(mod.kernel_size) in sizes)


def _channels(mod: nn.Module | None, which: str) -> int | None:
    names = {"in": ("in_channels", "in_features"), "out": ("out_channels", "out_features")}[which]
    for n in names:
        if hasattr(mod, n):
            return getattr(mod, n)
    return None


def channels_between(which: str, low: int | None = None, high: int | None = None) -> Predicate:
    """Modules whose input (``which="in"``) or output channels/features lie in [low, high]."""
    def pred(node, mod):
        c = _channels(mod, which)
        return c is not None and (low is None or c >= low) and (high is None or c <= high)
    return pred
