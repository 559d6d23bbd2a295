"""Turning a rule's ``match`` block into a predicate over candidate sites."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from passes import glob_to_regex

from sparsify.core.activations import activation_kind
from sparsify.core.conv1d import is_conv1d

__all__ = ["Candidate", "compile_match", "op_name"]


@dataclass
class Candidate:
    """Something a rule can match: a graph node (``node`` set) or a module reached outside any
    graph (``node`` None). ``first`` / ``last``: whether it is a first / last compute layer."""

    name: str
    module: nn.Module | None
    node: fx.Node | None = None
    gm: fx.GraphModule | None = None
    prefix: str = ""
    first: bool = False
    last: bool = False

    @property
    def kind(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        return op_name(self.node) or self.node.op


def op_name(node: fx.Node | None) -> str | None:
    """``relu`` for ``F.relu`` / ``torch.relu`` / ``x.relu()``; None for other node kinds."""
    if node is None:
        return None
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).rstrip("_")
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    return None


def _as_list(v):
    return [v] if isinstance(v, str) else list(v)


def _type_names(module: nn.Module) -> set[str]:
    names = {c.__name__ for c in type(module).__mro__}
    if is_conv1d(module):
        # transformers' Conv1D is a Linear with its weight transposed: rules written for
        # Linear layers (every built-in weight recipe) reach GPT-2's projections too
        names.add("Linear")
    kind = activation_kind(module)
    if kind is not None:  # transformers' GELU variants match "GELU" (sparsify/core/activations.py)
        names.add(kind)
    return names


def compile_match(match: dict):
    """A predicate ``Candidate -> bool`` for a schema-valid ``match`` block.

    ``type`` and ``op`` are alternatives (a node matches either); every other key must hold.
    ``type`` names a class of the module or one of its bases; ``"Linear"`` also matches
    transformers' ``Conv1D`` (a transposed Linear), which ``"Conv1D"`` matches alone.

    >>> pred = compile_match({"type": "Conv2d", "name": "layer1.**"})
    >>> pred(Candidate("layer1.0.conv1", nn.Conv2d(1, 1, 1)))
    True
    """
    types = set(_as_list(match["type"])) if "type" in match else None
    ops = {o.rstrip("_") for o in _as_list(match["op"])} if "op" in match else None
    names = [glob_to_regex(p) for p in _as_list(match["name"])] if "name" in match else None
    not_names = [glob_to_regex(p) for p in _as_list(match["not_name"])] if "not_name" in match else []
    kernel = set(match["kernel_size"]) if "kernel_size" in match else None

    def pred(c: Candidate) -> bool:
        if types is not None or ops is not None:
            hit = (types is not None and c.module is not None and bool(types & _type_names(c.module)))
            hit = hit or (ops is not None and op_name(c.node) in ops)
            if not hit:
                return False
        if names is not None and not any(r.fullmatch(c.name) for r in names):
            return False
        if any(r.fullmatch(c.name) for r in not_names):
            return False
        if "first" in match and c.first != match["first"]:
            return False
        if "last" in match and c.last != match["last"]:
            return False
        m = c.module
        groups = getattr(m, "groups", 1)
        if "grouped" in match and (groups > 1) != match["grouped"]:
            return False
        if "depthwise" in match:
            dw = groups > 1 and groups == getattr(m, "in_channels", -1)
            if dw != match["depthwise"]:
                return False
        if kernel is not None and not (hasattr(m, "kernel_size") and max(m.kernel_size) in kernel):
            return False
        for key, attrs in (("in_channels", ("in_channels", "in_features", "nx")),
                           ("out_channels", ("out_channels", "out_features", "nf"))):
            if key in match:
                value = next((getattr(m, a) for a in attrs if hasattr(m, a)), None)
                lo, hi = match[key].get("min"), match[key].get("max")
                if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
                    return False
        return True

    return pred
