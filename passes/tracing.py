"""Tracing that goes only as deep as a rewrite needs, and survives untraceable submodules.

A submodule is traced through only when ``descend(qualname, module)`` says so; otherwise it stays
one ``call_module`` node. That keeps code such as ``if self.training:`` live inside the leaves
instead of baking the trace-time mode into the graph. A submodule whose forward cannot be traced
(data-dependent control flow, iteration over a proxy, ...) is turned into a leaf automatically and
recorded as a :class:`Fallback`; its own children are then traced one by one, so a rewrite can
still reach inside it. When the root itself cannot be traced, the same happens one level down.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .call_record import CallRecord
from .calls import CallGuard, call_shell, keep_argument_names
from .checkpoint_guard import CheckpointInGraph, refuse_checkpoint
from .mode_branches import same_in_both_modes
from .traced import TracedModule, traced_module
from .traced import _unpickle_traced  # noqa: F401  (pickles made before traced.py name it here)

__all__ = ["Fallback", "TraceResult", "TracedModule", "CallRecord", "trace", "traced_module", "module_path_of"]

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
    # warnings raised while tracing (torch.fx internals, code run on proxies), held back so that
    # a caller can summarise them in one line: ``"<category>: <first line>"``, without repeats
    warnings: list[str] = field(default_factory=list)
    capture: str = "fx"  # what captured the graphs: "fx" (torch.fx) or "export" (passes.export_capture)
    notes: list[str] = field(default_factory=list)  # what the capture wants the user to know
    # qualified names of the model's first and last compute modules, once a caller worked them
    # out (passes.ends.model_ends): what a rule's first / last match against
    ends: tuple[set[str], set[str]] | None = None


#: module attributes that switch a forward's behaviour like ``training`` does: a graph follows the
#: value they had at trace time, and a call made with another value runs the module's own forward
#: (``grad_checkpointing``: timm's switch; ``gradient_checkpointing``: transformers')
MODE_FLAGS = ("training", "grad_checkpointing", "gradient_checkpointing")


class _DepthTracer(fx.Tracer):
    # defaults: torch rebuilds a pickled GraphModule with a subclass of the tracer that made it
    def __init__(self, descend: Descend | None = None, forced_leaves: set[str] | None = None, prefix: str = ""):
        super().__init__()
        self._descend = descend or (lambda name, m: True)
        self._forced = forced_leaves if forced_leaves is not None else set()
        self._prefix = prefix
        self.culprit: str | None = None
        self.modes: dict[fx.Node, tuple[tuple[str, str], bool]] = {}  # get_attr node of a mode flag -> ((path, flag), value)
        self.baked: dict[tuple[str, str], bool] = {}  # flags that Python control flow read: the graph holds one branch
        self._saved: list[tuple[nn.Module, str, bool]] = []
        self.output_type: type | None = None

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        def noting_output_type(*a):
            # a graph returns a dataclass-dict (transformers' ModelOutput, diffusers' BaseOutput)
            # as a plain dict: TracedModule turns it back into this type
            result = fn(*a)
            if isinstance(result, dict) and type(result) is not dict:
                self.output_type = type(result)
            return result
        out = noting_output_type, args
        if is_module:
            # `self.training` in any forward traced through reads a graph node, so train()/eval()
            # still switch it (F.dropout(x, p, training=self.training) stays live); the same for the
            # other MODE_FLAGS (a gradient-checkpointing switch turned on after sparsify)
            for name, m in self.root.named_modules():
                for flag in MODE_FLAGS:
                    value = m.__dict__.get(flag)
                    if isinstance(value, bool):
                        proxy = self.create_proxy("get_attr", f"{name}.{flag}" if name else flag, (), {})
                        self.modes[proxy.node] = ((name, flag), value)
                        self._saved.append((m, flag, value))
                        m.__dict__[flag] = proxy
        return out

    def trace(self, root, concrete_args=None):
        # torch also rebuilds an unpickled GraphModule with (a subclass of) this tracer: the modes
        # are put back here, not only by :func:`trace`, or the modules keep proxies as ``training``
        graph = None
        try:
            graph = super().trace(root, concrete_args)
            return graph
        finally:
            self.restore_modes(graph)

    def restore_modes(self, graph: fx.Graph | None) -> None:
        for m, flag, value in self._saved:
            m.__dict__[flag] = value
        self._saved.clear()
        for node in list(graph.nodes) if graph is not None else ():
            if node in self.modes and not node.users:
                graph.erase_node(node)

    def to_bool(self, obj):
        # `if self.training:` cannot stay live in a graph: it takes the trace-time branch, and
        # the graph's CallGuard sends calls in the other mode to the module's own forward
        if obj.node in self.modes:
            key, value = self.modes[obj.node]
            self.baked[key] = value
            return value
        return super().to_bool(obj)

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


def _hold(result: TraceResult, caught: list) -> None:
    for w in caught:
        text = str(w.message).strip().splitlines()
        line = f"{w.category.__name__}: {text[0] if text else ''}"
        if line not in result.warnings:
            result.warnings.append(line)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@contextlib.contextmanager
def proxies_are_tensors() -> Iterator[None]:
    """While tracing, ``torch.is_tensor`` and ``torch.jit.isinstance(x, torch.Tensor)`` say True of
    a traced value: code that branches on them (diffusers' UNets: ``if not torch.is_tensor(t): t =
    torch.tensor([t])``; MONAI's ``UpCat`` concatenates its skip input only
    ``if torch.jit.isinstance(x_e, torch.Tensor)``) then records the tensor branch, not one for
    other values that fails on every real call or, worse, silently computes something else.

    >>> with proxies_are_tensors():
    ...     x = fx.Proxy(fx.Graph().placeholder("x"))
    ...     torch.is_tensor(x), torch.jit.isinstance(x, torch.Tensor), torch.jit.isinstance(x, int)
    (True, True, False)
    >>> torch.is_tensor(fx.Proxy(fx.Graph().placeholder("x")))
    False
    """
    is_tensor, jit_isinstance = torch.is_tensor, torch.jit.isinstance

    def traced_jit_isinstance(obj, target_type):
        if isinstance(obj, fx.Proxy):
            return isinstance(target_type, type) and issubclass(torch.Tensor, target_type)
        return jit_isinstance(obj, target_type)

    torch.is_tensor = lambda obj: isinstance(obj, (torch.Tensor, fx.Proxy))
    torch.jit.isinstance = traced_jit_isinstance
    try:
        yield
    finally:
        torch.is_tensor, torch.jit.isinstance = is_tensor, jit_isinstance


def trace(root: nn.Module, descend: Descend | None = None, *, is_site: Descend | None = None,
          prefix: str = "", max_fallbacks: int = 1000, calls: CallRecord | None = None,
          concrete_args: dict | None = None, shell: Descend | None = None) -> TraceResult:
    """Symbolically trace ``root``, descending only where ``descend`` says, with fallbacks.

    ``descend(qualname, module)`` is asked for every non-standard submodule (``torch.nn``'s own
    modules are always leaves); ``None`` descends everywhere, like ``torch.fx.symbolic_trace``.
    ``is_site(qualname, module)`` names modules a caller wants to rewrite; inside fallbacks they
    are reported in ``TraceResult.direct``. The root's ``training`` flag is used as is: call
    ``root.train()`` first to trace the training behaviour. ``calls`` (a :class:`CallRecord` of
    the same root) specialises children traced under an untraceable parent to how that parent
    calls them (arguments it passes as ``None`` or as a flag); ``concrete_args`` goes to
    ``torch.fx.Tracer.trace`` for ``root`` itself. ``shell(qualname, module)`` names leaves (an
    activation module) that, called by an untraceable parent, get a graph of their own holding one
    call of them (:func:`passes.calls.call_shell`), so nodes can be inserted after them.

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
        graph = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with refuse_checkpoint(root), proxies_are_tensors():  # a graph would drop checkpointing
                        graph = tracer.trace(root, concrete_args or None)
                finally:
                    _hold(result, caught)
            keep_argument_names(graph, concrete_args or {})
        except Exception as exc:  # any tracing failure becomes a fallback, never a crash
            error = exc
        else:
            error = None
        finally:
            tracer.restore_modes(graph)
        if error is None:
            break
        culprit = tracer.culprit
        if culprit is None or culprit in forced or len(forced) >= max_fallbacks:
            # the children are traced one by one now: the culprits forced so far are met again there
            result.fallbacks = [f for f in result.fallbacks if f.name not in
                                {f"{prefix}.{c}" if prefix else c for c in forced}]
            result.fallbacks.append(Fallback(prefix, _first_line(error)))
            # a forward that checkpoints may run the blocks of a Sequential one by one (timm's
            # checkpoint_seq): each block gets its own graph, or one graph over the Sequential
            # would hold their inserted nodes where those calls never look
            _trace_children(root, descend, is_site, prefix, result, calls, shell,
                            blockwise=isinstance(error, CheckpointInGraph))
            return result
        forced.add(culprit)
        full = f"{prefix}.{culprit}" if prefix else culprit
        result.fallbacks.append(Fallback(full, _first_line(error)))
    baked = tracer.baked
    if any(flag == "training" for _, flag in baked):
        def retrace():
            again = _DepthTracer(descend, forced, prefix)
            with warnings.catch_warnings(), refuse_checkpoint(root), proxies_are_tensors():
                warnings.simplefilter("ignore")
                g = again.trace(root, concrete_args or None)
            keep_argument_names(g, concrete_args or {})
            return g if again.baked.keys() == baked.keys() else fx.Graph()
        if same_in_both_modes(root, graph, baked, retrace):
            # the branch only changed a memory layout: the graph serves both modes
            baked = {key: value for key, value in baked.items() if key[1] != "training"}
    gm = traced_module(root, graph)
    output_type = tracer.output_type or root.__dict__.get("_output_type")  # a retrace returns the dict
    if output_type is not None:
        gm.__dict__["_output_type"] = output_type
    # any other way of calling it, or the other mode where the graph took one branch, runs its
    # own forward (see passes/calls.py)
    gm._call_guard = CallGuard.for_module(root, concrete_args or {}, graph, baked)
    result.module = gm
    result.graphs[prefix] = gm
    for leaf in sorted(forced):
        _trace_children(gm.get_submodule(leaf), descend, is_site,
                        f"{prefix}.{leaf}" if prefix else leaf, result, calls, shell)
    return result


def _trace_children(parent: nn.Module, descend: Descend, is_site: Descend, prefix: str,
                    result: TraceResult, calls: CallRecord | None = None, shell: Descend | None = None,
                    blockwise: bool = False) -> None:
    for child_name, child in list(parent.named_children()):
        full = f"{prefix}.{child_name}" if prefix else child_name
        if is_site(full, child):
            result.direct.append(full)
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)) or (blockwise and type(child) is nn.Sequential):
            # containers are never called themselves: look at what they hold
            _trace_children(child, descend, is_site, full, result, calls, shell, blockwise)
        elif shell is not None and shell(full, child):
            gm = call_shell(child, child_name)
            setattr(parent, child_name, gm)
            result.graphs[full] = gm
        elif not _is_torch_leaf(child) and descend(full, child):
            # the parent's own code calls this child: trace it as it is called there
            concrete = calls.concrete_args(full, child) if calls is not None else None
            sub = trace(child, descend, is_site=is_site, prefix=full, calls=calls, concrete_args=concrete,
                        shell=shell)
            if sub.module is not child:
                setattr(parent, child_name, sub.module)
            result.graphs.update(sub.graphs)
            result.fallbacks.extend(sub.fallbacks)
            result.direct.extend(sub.direct)
            result.warnings.extend(w for w in sub.warnings if w not in result.warnings)



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
