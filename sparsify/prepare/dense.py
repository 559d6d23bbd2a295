"""Why each Conv/Linear layer the rewrite left alone stays dense: the plan's entries for them
(a weight read outside a module call, a leaf that reads weights itself, a rule that excluded it,
a method that declined it, or no rule at all)."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from passes.tracing import TraceResult

from sparsify.core.contract import Site
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.prepare.fast_path import TRANSFORMER_LAYERS  # their linear1 / linear2 are rewritable
from sparsify.prepare.matching import Candidate, MatchTable
from sparsify.prepare.plan_entry import PlanEntry

__all__ = ["dense_entries"]

_PROJECTIONS = ("in_proj", "q_proj", "k_proj", "v_proj")  # MultiheadAttention's <proj>_weight parameters


def _attention_entries(name: str, mha: nn.MultiheadAttention, matcher: MatchTable) -> list[PlanEntry]:
    """The projection weights ``mha`` holds as parameters (packed ``in_proj_weight``, or separate
    ``q/k/v_proj_weight``) that no rule's method takes. One a method takes (the attention is then
    converted, see :mod:`sparsify.prepare.hidden`) is listed as ``<mha>.<proj>`` by the rewrite,
    rewritten or with why its method declined, so it is not listed here a second time."""
    entries = []
    for proj in _PROJECTIONS:
        weight = mha._parameters.get(f"{proj}_weight")
        if weight is None:
            continue
        full = f"{name}.{proj}" if name else proj
        view = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # what the rules match
        w = matcher.winner(Candidate(full, view))
        if w is not None and w.method is not None:
            continue
        why = f"excluded by rule {w.rule.index}" if w is not None else \
            "parameter read directly by nn.MultiheadAttention (no module call to rewrite)"
        entries.append(PlanEntry(f"{full}_weight", f"MultiheadAttention.{proj}_weight", None,
                                 w.rule.index if w else None, why, weight.numel()))
    return entries


def _in_untraceable(name: str, tr: TraceResult) -> bool:
    """Whether the innermost module around layer ``name`` that the trace kept or captured is one
    it kept because it could not be traced: not a graph traced below it (a root kept module by
    module, its children traced), nor a module kept by choice (``Fallback.chosen``).

    >>> from passes.tracing import Fallback
    >>> tr = TraceResult(nn.Module(), graphs={"body": None}, fallbacks=[Fallback("", "untraceable")])
    >>> _in_untraceable("body.0", tr), _in_untraceable("head", tr)
    (False, True)
    """
    def depth(prefix: str) -> int | None:  # how deep ``prefix`` holds ``name``, None when it does not
        return len(prefix) if prefix == "" or name.startswith(prefix + ".") else None
    # (depth, a graph wins a tie, untraceable) of every graph and kept module around it
    around = [(d, 1, False) for p in tr.graphs if (d := depth(p)) is not None]
    around += [(d, 0, not f.chosen) for f in tr.fallbacks if (d := depth(f.name)) is not None]
    return max(around, default=(0, 0, False))[2]


def dense_entries(root: nn.Module, tr: TraceResult, all_cands: list[Candidate], matcher: MatchTable,
                   rewritten: set[str]) -> list[PlanEntry]:
    """Every Conv/Linear weight (and MultiheadAttention projection) left dense, with why."""
    by_name = {c.name: c for c in all_cands}
    first, last = tr.ends or (set(), set())
    get_attr_owners = {}
    for prefix, gm in tr.graphs.items():
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                get_attr_owners[f"{prefix}.{owner}" if prefix else owner] = prefix or "<root>"
    leaves = {}  # torch leaf modules that own weight layers (e.g. MultiheadAttention)
    for name, m in root.named_modules():
        if not isinstance(m, (*WEIGHT_TYPES, nn.ModuleList, nn.ModuleDict)) and type(m) not in TRANSFORMER_LAYERS \
                and fx.Tracer().is_leaf_module(m, "") and any(isinstance(c, WEIGHT_TYPES) for c in m.modules()):
            leaves[name] = m
    entries = []
    for name, m in root.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            entries.extend(_attention_entries(name, m, matcher))
        if not isinstance(m, WEIGHT_TYPES) or name in rewritten:
            continue
        owner_leaf = next((leaf for leaf in leaves if name.startswith(leaf + ".")), None)
        inside_fallback = _in_untraceable(name, tr)
        # a layer no graph reached (inside a fallback, or a leaf holding no site) is matched as
        # the rules see it, so the plan names the rule that kept it dense
        c = by_name.get(name) or Candidate(name, m, first=name in first, last=name in last)
        w = matcher.winner(c)
        rule = w.rule.index if w else None
        if name in get_attr_owners:
            reason = f"weight read outside a module call (get_attr in graph {get_attr_owners[name]})"
        elif owner_leaf is not None:
            reason = f"inside leaf {type(leaves[owner_leaf]).__name__} {owner_leaf}, which reads the weights directly"
        elif w is None and (refusal := matcher.refusal(c)):
            reason, rule = refusal  # the rule that matched it, whose method does not take its type
        elif w is not None and w.method is None:
            reason = f"excluded by rule {w.rule.index}"
        elif w is not None:
            reason = w.method.accepts(Site(name, m, params=w.rule.params)) or "not rewritten"
        elif inside_fallback:
            reason = "no rule matched (inside an untraceable submodule)"
        else:
            reason = "no rule matched"
        entries.append(PlanEntry(name, type(m).__name__, None, rule, reason, m.weight.numel()))
    return entries
