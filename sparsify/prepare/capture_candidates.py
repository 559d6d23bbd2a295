"""The candidates a capture offers the rules: every node of every captured graph and every layer
swapped inside an untraceable module (:class:`~sparsify.prepare.matching.Candidate`), where each
sits (the modules whose forward holds it), and whether it is structural (a Conv/Linear or an
activation call, what rewrites that read around a site look for).

Apart from :mod:`sparsify.prepare.capture` because both captures (torch.fx and torch.export) are
read through them, and the fx capture's choice of depth too; that module keeps how a trace is made.
"""
from __future__ import annotations

from torch import nn

from passes import model_ends, node_name, target_module
from passes.tracing import CallRecord, TraceResult, enclosing_modules

from sparsify.core.activations import is_activation_module
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.prepare.matching import Candidate, op_name


def _is_compute(m: nn.Module) -> bool:
    return isinstance(m, WEIGHT_TYPES)


def _candidates(tr: TraceResult, root: nn.Module, calls: CallRecord | None = None) -> list[Candidate]:
    """Every node of every graph, and the layers swapped inside untraceable modules; ``first`` /
    ``last`` over the whole model (docs/recipes.md#first-and-last), not within each graph."""
    out = []
    if tr.ends is None:
        tr.ends = model_ends(tr, _is_compute, calls.call_order() if calls is not None and tr.fallbacks else None)
    first, last = tr.ends
    for prefix, gm in tr.graphs.items():
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            # the one call in a shell (passes.calls.call_shell) is named as the parent calls it
            shelled = node.op == "call_module" and node.target == getattr(gm, "shell_of", None)
            mod = target_module(gm, node)
            name = prefix if shelled else node_name(node, prefix)
            compute = mod is not None and _is_compute(mod)
            out.append(Candidate(name, mod, node, gm, prefix, compute and name in first, compute and name in last))
    for name in tr.direct:
        mod = root.get_submodule(name)
        out.append(Candidate(name, mod, first=_is_compute(mod) and name in first, last=_is_compute(mod) and name in last))
    return out


def _enclosing(c: Candidate) -> list[str]:
    """Qualified names of the modules whose forward contains ``c`` (not ``c``'s own module)."""
    if c.node is None:
        return []
    return [f"{c.prefix}.{p}" if c.prefix else p for p in enclosing_modules(c.node)]


_ACTIVATION_OPS = {"relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "leaky_relu", "elu",
                   "selu", "celu", "mish", "sigmoid", "tanh", "hardtanh", "softplus"}


def _structural(c: Candidate) -> bool:
    """A Conv/Linear call or an activation call: what rewrites that read around a site look for."""
    if c.module is not None:
        return isinstance(c.module, WEIGHT_TYPES) or is_activation_module(c.module)
    return op_name(c.node) in _ACTIVATION_OPS
