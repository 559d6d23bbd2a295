"""Which modules inside a graph that does not reproduce its forward (passes/reproduce.py) were
traced wrongly: the innermost ones whose own graph does not reproduce theirs on the inputs the
example forward gave them. :func:`passes.tracing.trace` turns those into leaves, as it does with
a module whose forward raised while traced, so one wrong ``isinstance`` deep in a block costs
that block's graph, not the whole model's.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .call_record import CallRecord
from .calls import _is_torch_leaf
from .depth_tracer import Descend, capture_graph
from .reproduce import reproduces

__all__ = ["mistraced_modules", "NOT_REPRODUCED", "RANDOM_DRAW"]

#: why a module whose graph computes something else than its forward runs its own forward
NOT_REPRODUCED = ("its traced graph computes something else than its forward on the example inputs (Python code "
                  "the trace could not follow, e.g. isinstance(x, torch.Tensor) of a traced value)")
#: why a module whose forward draws Python random numbers runs its own forward
RANDOM_DRAW = ("its forward draws from Python's random (a LayerDrop?): a graph would hold one fixed outcome of the "
               "draw")


def _traced_through(module: nn.Module, rel: str, descend: Descend, prefix: str, forced: set[str]):
    """``(path from the traced root, module)`` of the modules a trace of ``module`` (at ``rel``)
    calls through rather than as leaves; a ModuleList / ModuleDict is never called: its items are."""
    for name, child in module.named_children():
        path = f"{rel}.{name}" if rel else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _traced_through(child, path, descend, prefix, forced)
        elif path not in forced and not _is_torch_leaf(child) and descend(f"{prefix}.{path}" if prefix else path, child):
            yield path, child


def mistraced_modules(root: nn.Module, descend: Descend, prefix: str, forced: set[str],
                      calls: CallRecord | None) -> list[tuple[str, str]]:
    """``(path from root, reason)`` of the innermost traced-through modules (``root`` traced at
    ``prefix``) whose graph alone draws Python random numbers or, with ``calls``, computes
    something else than their forward; empty when none does, so that ``root``'s own forward is
    the one. Costs an example forward per level searched, and runs only for a graph that failed
    the check."""
    return _search(root, "", descend, prefix, forced, calls)


def _search(module: nn.Module, rel: str, descend: Descend, prefix: str, forced: set[str],
            calls: CallRecord | None) -> list[tuple[str, str]]:
    full = (lambda p: f"{prefix}.{p}" if prefix else p)  # noqa: E731
    inside = list(_traced_through(module, rel, descend, prefix, forced))
    if calls is not None:
        calls.hold_inputs([full(p) for p, _ in inside])
    wrong = []
    for path, child in inside:
        example = calls.inputs(full(path), child) if calls is not None else None
        own = {f[len(path) + 1:] for f in forced if f.startswith(path + ".")}
        concrete = calls.concrete_args(full(path), child) if calls is not None else None
        tracer, graph, _ = capture_graph(child, descend, own, full(path), concrete, [], lambda: example)
        if graph is None:
            continue
        if tracer.drew_random:
            wrong += _search(child, path, descend, prefix, forced, calls) or [(path, RANDOM_DRAW)]
        elif example is not None and reproduces(child, fx.GraphModule(child, graph), *example) is False:
            wrong += _search(child, path, descend, prefix, forced, calls) or [(path, NOT_REPRODUCED)]
    return wrong
