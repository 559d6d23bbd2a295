"""Tracing that goes only as deep as a rewrite needs, and survives untraceable submodules.

A submodule is traced through only when ``descend(qualname, module)`` says so; otherwise it stays
one ``call_module`` node. That keeps code such as ``if self.training:`` live inside the leaves
instead of baking the trace-time mode into the graph. A submodule whose forward cannot be traced
(data-dependent control flow, iteration over a proxy, ...) is turned into a leaf automatically and
recorded as a :class:`Fallback`; its own children are then traced one by one, so a rewrite can
still reach inside it. When the root itself cannot be traced, the same happens one level down.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from .call_record import CallRecord
from .calls import CallGuard, _is_torch_leaf, call_shell, keep_argument_names
from .checkpoint_guard import CheckpointInGraph
from .depth_tracer import Descend, _DepthTracer, _first_line, _hold, capture_graph  # noqa: F401  (_DepthTracer: pickles name it here)
from .depth_tracer import traced_under_guards
from .mistraced import NOT_REPRODUCED, RANDOM_DRAW, mistraced_modules
from .mode_branches import MODE_KEPT, MODE_SPLIT, mode_split, same_in_both_modes
from .module_stack import enclosing_modules, module_path_of, traced_through  # noqa: F401  (re-exported)
from .reproduce import reproduces
from .traced import TracedModule, traced_module
from .traced import _unpickle_traced  # noqa: F401  (pickles made before traced.py name it here)

__all__ = ["Fallback", "TraceResult", "TracedModule", "CallRecord", "trace", "traced_module", "module_path_of",
           "enclosing_modules"]



@dataclass
class Fallback:
    """A submodule that could not be traced and was kept as an opaque leaf."""

    name: str  # qualified name from the traced root ("" is the root itself)
    reason: str  # first line of the exception raised while tracing it
    chosen: bool = False  # not untraceable: the caller asked for it (``trace(split=...)``)


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
    # (parent, attribute, original child) for every child replaced by its graph below an
    # untraceable module, in order: what :meth:`restore` puts back
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def restore(self) -> None:
        """Put back the children this trace replaced by their graphs (below untraceable modules,
        where the parent itself is kept), so that the model can be traced again from its own
        modules: a second trace of a replaced child would read the first trace's graph, which
        went as deep as that trace did."""
        for parent, name, child in reversed(self.replaced):
            setattr(parent, name, child)
        self.replaced = []


def trace(root: nn.Module, descend: Descend | None = None, *, is_site: Descend | None = None,
          prefix: str = "", max_fallbacks: int = 1000, calls: CallRecord | None = None,
          concrete_args: dict | None = None, shell: Descend | None = None, split: str | None = None,
          wraps: Descend | None = None) -> TraceResult:
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
    call of them (:func:`passes.calls.call_shell`), so nodes can be inserted after them. ``wraps``
    (``shell`` when None) names the activations whose module, when its forward branches on
    ``self.training``, runs as it is (:func:`passes.mode_branches.mode_split`): a caller that gives
    no shell still keeps such a module out of its graph, which then serves both modes. ``split``,
    a reason: ``root`` runs its own forward and its children are traced one by one, as if it were
    untraceable (a caller's policy: one graph of ``root`` would not serve all of its calls).

    >>> import torchvision
    >>> r = trace(torchvision.models.resnet18(), lambda name, m: name.startswith("layer1"))
    >>> [n.target for n in r.module.graph.nodes if n.op == "call_module"][4:6]
    ['layer1.0.conv1', 'layer1.0.bn1']
    """
    descend = descend or (lambda name, m: True)
    is_site = is_site or (lambda name, m: False)
    result = TraceResult(module=root)
    forced: set[str] = set()
    checkpointing: set[str] = set()  # leaves forced for calling torch.utils.checkpoint
    split_all: set[str] = set()  # leaves forced for their mode branch (mode_split)
    example: tuple | None = None
    if split is not None:
        return _fall_back(root, descend, is_site, prefix, result, calls, shell, forced, split, chosen=True,
                          wraps=wraps)

    def example_call():  # the module's inputs in the example forward, fetched at the first question
        nonlocal example
        if example is None and calls is not None:
            example = calls.inputs(prefix, root)
        return example
    while True:
        while True:
            caught: list = []
            tracer, graph, error = capture_graph(root, descend, forced, prefix, concrete_args, caught, example_call)
            _hold(result, caught)
            if error is None:
                break
            culprit = tracer.culprit
            if culprit is None or culprit in forced or len(forced) >= max_fallbacks:
                # a forward that checkpoints may run the blocks of a Sequential one by one (timm's
                # checkpoint_seq): each block gets its own graph, or one graph over the Sequential
                # would hold their inserted nodes where those calls never look
                return _fall_back(root, descend, is_site, prefix, result, calls, shell, forced, _first_line(error),
                                  blockwise=isinstance(error, CheckpointInGraph), wraps=wraps)
            _force(forced, [culprit], _first_line(error), prefix, result)
            if isinstance(error, CheckpointInGraph):
                checkpointing.add(culprit)
        gm = _graph_module(root, descend, forced, prefix, concrete_args, tracer, graph, example_call)
        guard = gm.__dict__.get("_call_guard")
        split_modes = mode_split(root, guard.modes if guard is not None else {}, prefix, forced, is_site,
                                 wraps or shell)
        if split_modes and len(forced) < max_fallbacks:
            _force(forced, split_modes, MODE_SPLIT if shell is not None else MODE_KEPT, prefix, result, chosen=True)
            split_all.update(split_modes)
            continue
        if not tracer.drew_random:
            through = traced_through(graph)
            if calls is None or calls.vouched(prefix, through):
                break
            example_call()
            verdict = reproduces(root, gm, *example) if example is not None else None
            if verdict is not False:
                if verdict:
                    calls.vouch(prefix, through)
                break
        # a graph that computes something else: the modules that asked the question become leaves
        # like culprits that raised, or the root runs its own forward when it asked itself
        wrong = mistraced_modules(root, descend, prefix, forced, calls)
        if not wrong or len(forced) >= max_fallbacks:
            return _fall_back(root, descend, is_site, prefix, result, calls, shell, forced,
                              RANDOM_DRAW if tracer.drew_random else NOT_REPRODUCED, wraps=wraps)
        for path, reason in wrong:
            _force(forced, [path], reason, prefix, result)
    result.module = gm
    result.graphs[prefix] = gm
    if split_all & forced:
        # which leaves run as they are for their mode branch: a rewrite that reads across one says why
        gm.__dict__["_mode_split"] = tuple(sorted(split_all & forced))
    for leaf in sorted(forced):
        # a checkpointing leaf (timm's ConvNeXt stage: checkpoint_seq over its blocks) runs its
        # Sequential's blocks one by one, as a checkpointing root does
        _trace_children(gm.get_submodule(leaf), descend, is_site,
                        f"{prefix}.{leaf}" if prefix else leaf, result, calls, shell, blockwise=leaf in checkpointing,
                        wraps=wraps)
    hooked = sorted(tracer.hooked)  # modules with hooks: called by the graph, their code in a graph of their own
    if hooked and calls is not None:
        calls.hold_inputs([f"{prefix}.{p}" if prefix else p for p in hooked])
    for path in hooked:
        full = f"{prefix}.{path}" if prefix else path
        result.notes.append(f"{full} keeps its own call for the hooks registered on it (they run); no rewrite "
                            "reaches across that call")
        parent, _, name = path.rpartition(".")
        _trace_alone(gm.get_submodule(parent), name, full, descend, is_site, result, calls, shell, wraps)
    return result


def _force(forced: set[str], names: list[str], reason: str, prefix: str, result: TraceResult,
           chosen: bool = False) -> None:
    """Make ``names`` leaves of the graph. A leaf inside another is dropped with its fallback:
    the outer one's children are traced one by one, where it is met again."""
    full = (lambda n: f"{prefix}.{n}" if prefix else n)  # noqa: E731
    forced.update(names)
    inner = {n for n in forced if any(n.startswith(o + ".") for o in forced)}
    forced -= inner
    result.fallbacks = [f for f in result.fallbacks if f.name not in {full(n) for n in inner}]
    result.fallbacks += [Fallback(full(n), reason, chosen) for n in names if n not in inner]


def _graph_module(root: nn.Module, descend: Descend, forced: set[str], prefix: str, concrete_args: dict | None,
                  tracer: _DepthTracer, graph: fx.Graph, example=None) -> fx.GraphModule:
    """The module of ``graph``: its output type, and the guard that sends calls it was not traced
    for (other arguments, inputs of other ranks, the other mode where its forward branched on one)
    to the own forward."""
    baked = tracer.baked
    if any(flag == "training" for _, flag in baked):
        def retrace():
            again = _DepthTracer(descend, forced, prefix, example)
            with warnings.catch_warnings(), traced_under_guards(again, root):
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
    ranks = {str(t.target): rank for t, rank in tracer.ranks.items() if t.op == "placeholder"}
    gm._call_guard = CallGuard.for_module(root, concrete_args or {}, graph, baked, ranks, tracer.var_keys, example)
    return gm


def _fall_back(root: nn.Module, descend: Descend, is_site: Descend, prefix: str, result: TraceResult,
               calls: CallRecord | None, shell: Descend | None, forced: set[str], reason: str,
               blockwise: bool = False, chosen: bool = False, wraps: Descend | None = None) -> TraceResult:
    """``root`` runs its own forward; its children are traced one by one, where the culprits
    forced to leaves so far are met again (so they are not listed twice)."""
    result.fallbacks = [f for f in result.fallbacks if f.name not in {f"{prefix}.{c}" if prefix else c for c in forced}]
    result.fallbacks.append(Fallback(prefix, reason, chosen))
    _trace_children(root, descend, is_site, prefix, result, calls, shell, blockwise=blockwise, wraps=wraps)
    return result


def _trace_children(parent: nn.Module, descend: Descend, is_site: Descend, prefix: str,
                    result: TraceResult, calls: CallRecord | None = None, shell: Descend | None = None,
                    blockwise: bool = False, wraps: Descend | None = None) -> None:
    children = [(name, child, f"{prefix}.{name}" if prefix else name) for name, child in parent.named_children()]

    def kind(full: str, child: nn.Module) -> str | None:
        """What happens to a child here: rewritten as an attribute ("site"), looked into
        ("container": never called itself), given a one-call graph ("shell"), traced on its own
        ("trace"), or nothing (a leaf)."""
        if is_site(full, child):
            return "site"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or (blockwise and type(child) is nn.Sequential):
            return "container"
        if shell is not None and shell(full, child):
            return "shell"
        return "trace" if not _is_torch_leaf(child) and descend(full, child) else None

    def traced_alone(module, path):
        """Qualified names of the modules traced one by one below ``module``: its children, and
        the items of the containers among them."""
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            k = kind(full, child)
            if k == "container":
                yield from traced_alone(child, full)
            elif k == "trace":
                yield full
    if calls is not None:  # one example forward gives every module traced here its inputs for the check
        calls.hold_inputs([name for name in traced_alone(parent, prefix) if not calls.vouched(name)])
    for child_name, child, full in children:
        k = kind(full, child)
        if k == "site":
            result.direct.append(full)
        elif k == "container":
            _trace_children(child, descend, is_site, full, result, calls, shell, blockwise, wraps)
        elif k == "shell":
            gm = call_shell(child, child_name)
            result.replaced.append((parent, child_name, child))
            setattr(parent, child_name, gm)
            result.graphs[full] = gm
        elif k == "trace":
            _trace_alone(parent, child_name, full, descend, is_site, result, calls, shell, wraps)


def _trace_alone(parent: nn.Module, child_name: str, full: str, descend: Descend, is_site: Descend,
                 result: TraceResult, calls: CallRecord | None, shell: Descend | None,
                 wraps: Descend | None = None) -> None:
    """Trace ``parent``'s child ``child_name`` (``full`` in the model) on its own, as the code that
    calls it calls it, and put its module in its place."""
    child = parent._modules[child_name]
    concrete = calls.concrete_args(full, child) if calls is not None else None
    sub = trace(child, descend, is_site=is_site, prefix=full, calls=calls, concrete_args=concrete, shell=shell,
                wraps=wraps)
    result.replaced.extend(sub.replaced)
    if sub.module is not child:
        result.replaced.append((parent, child_name, child))
        setattr(parent, child_name, sub.module)
    result.graphs.update(sub.graphs)
    result.fallbacks.extend(sub.fallbacks)
    result.direct.extend(sub.direct)
    result.warnings.extend(w for w in sub.warnings if w not in result.warnings)
