"""Tracing that goes only as deep as a rewrite needs, and survives untraceable submodules.

A submodule is traced through only when ``descend(qualname, module)`` says so; otherwise it stays
one ``call_module`` node. That keeps code such as ``if self.training:`` live inside the leaves
instead of baking the trace-time mode into the graph. A submodule whose forward cannot be traced
(data-dependent control flow, iteration over a proxy, ...) is turned into a leaf automatically and
recorded as a :class:`Fallback`; its own children are then traced one by one, so a rewrite can
still reach inside it. When the root itself cannot be traced, the same happens one level down.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx
from torch import nn

__all__ = ["Fallback", "TraceResult", "trace", "module_path_of"]

Descend = Callable[[str, nn.Module], bool]


@dataclass
class Fallback:
    """A submodule that could not be traced and was kept as an opaque leaf."""

    name: str  # qualified name from the traced root ("" is the root itself)
    reason: str  # first line of the exception raised while tracing it


@dataclass
class TraceResult:
    """What :func:`trace` produced.

    ``module`` replaces the input module (a ``GraphModule`` unless the root failed to trace, in
    which case it is the root with traced children). ``graphs`` maps the qualified name of every
    ``GraphModule`` inside ``module`` ("" for ``module`` itself) to it. ``direct`` lists the
    qualified names of modules, found inside fallbacks, for which ``is_site`` held: these cannot
    be reached through a graph and have to be swapped as attributes.
    """

    module: nn.Module
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)


class _DepthTracer(fx.Tracer):
    def __init__(self, descend: Descend, forced_leaves: set[str], prefix: str):
        super().__init__()
        self._descend = descend
        self._forced = forced_leaves
        self._prefix = prefix
        self.culprit: str | None = None

    def _full(self, qualname: str) -> str:
        return f"{self._prefix}.{qualname}" if self._prefix else qualname

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._forced or super().is_leaf_module(m, module_qualified_name):
            return True
        return not self._descend(self._full(module_qualified_name), m)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the innermost module whose forward raised is the one to turn into a leaf
            if self.culprit is None:
                self.culprit = self.path_of_module(m)
            raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def trace(root: nn.Module, descend: Descend | None = None, *, is_site: Descend | None = None,
          prefix: str = "", max_fallbacks: int = 1000) -> TraceResult:
    """Symbolically trace ``root``, descending only where ``descend`` says, with fallbacks.

    ``descend(qualname, module)`` is asked for every non-standard submodule (``torch.nn``'s own
    modules are always leaves); ``None`` descends everywhere, like ``torch.fx.symbolic_trace``.
    ``is_site(qualname, module)`` names modules a caller wants to rewrite; inside fallbacks they
    are reported in ``TraceResult.direct``. The root's ``training`` flag is used as is: call
    ``root.train()`` first to trace the training behaviour.

    >>> import torchvision
    >>> r = trace(torchvision.models.resnet18(), lambda name, m: name.startswith("layer1"))
    >>> [n.target for n in r.module.graph.nodes if n.op == "call_module"][4:6]
    ['layer1.0.conv1', 'layer1.0.bn1']
    """
    descend = descend or (lambda name, m: True)
    is_site = is_site or (lambda name, m: False)
    result = TraceResult(module=root)
    forced: set[str] = set()
    while True:
        tracer = _DepthTracer(descend, forced, prefix)
        try:
            graph = tracer.trace(root)
            break
        except Exception as exc:  # any tracing failure becomes a fallback, never a crash
            culprit = tracer.culprit
            if culprit is None or culprit in forced or len(forced) >= max_fallbacks:
                result.fallbacks.append(Fallback(prefix, _first_line(exc)))
                _trace_children(root, descend, is_site, prefix, result)
                return result
            forced.add(culprit)
            full = f"{prefix}.{culprit}" if prefix else culprit
            result.fallbacks.append(Fallback(full, _first_line(exc)))
    name = root.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    _keep_hierarchy(root, gm)
    gm.training = root.training
    result.module = gm
    result.graphs[prefix] = gm
    for leaf in sorted(forced):
        _trace_children(gm.get_submodule(leaf), descend, is_site,
                        f"{prefix}.{leaf}" if prefix else leaf, result)
    return result


def _trace_children(parent: nn.Module, descend: Descend, is_site: Descend, prefix: str,
                    result: TraceResult) -> None:
    for child_name, child in list(parent.named_children()):
        full = f"{prefix}.{child_name}" if prefix else child_name
        if is_site(full, child):
            result.direct.append(full)
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            # containers are never called themselves: look at what they hold
            _trace_children(child, descend, is_site, full, result)
        elif not _is_torch_leaf(child) and descend(full, child):
            sub = trace(child, descend, is_site=is_site, prefix=full)
            if sub.module is not child:
                setattr(parent, child_name, sub.module)
            result.graphs.update(sub.graphs)
            result.fallbacks.extend(sub.fallbacks)
            result.direct.extend(sub.direct)


def _keep_hierarchy(root: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the root's own children, parameters and buffers.

    ``GraphModule`` rebuilds only the paths the graph uses, with plain ``Module`` containers;
    keeping the original objects keeps ``model.layer1[0]`` indexable, modules the graph does not
    call (e.g. heads used only in the other mode) and every state_dict key of the original.
    """
    for child_name, child in root.named_children():
        gm._modules[child_name] = child
    for pname, p in root._parameters.items():
        if pname not in gm._parameters:
            gm.register_parameter(pname, p)
    for bname, b in root._buffers.items():
        if bname not in gm._buffers:
            gm.register_buffer(bname, b, persistent=bname not in root._non_persistent_buffers_set)


def _is_torch_leaf(m: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(m, "")


def module_path_of(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ("" at the root).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> module_path_of(list(gm.graph.nodes)[1])
    '0'
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]
