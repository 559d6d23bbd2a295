"""What ``capture="auto"`` weighs around ``torch.export`` (:func:`sparsify.prepare.capture.capture`):
whether the model is likely called with arguments the example lacks (an exported graph serves the
example's arguments only),
whether export could reach a function call that module-by-module rewriting misses (else it is not
tried), and how many sites each capture reaches.

Apart from :mod:`sparsify.prepare.capture`, which keeps the decision itself and the export call.
"""
from __future__ import annotations

import inspect

from torch import nn

from passes import own_calls
from passes.call_inputs import input_tuple
from passes.tracing import TraceResult

from sparsify.prepare.matching import Candidate, MatchTable


def _reached(cands: list[Candidate], matcher: MatchTable) -> int:
    """How many sites a rule with a method matches."""
    return sum(1 for c in cands if (w := matcher.winner(c)) is not None and w.method is not None)


def _keyword_calls(root: nn.Module) -> str:
    """Why ``root`` is likely called with arguments the example lacks ("" if not): its forward
    takes ``**kwargs`` (transformers' models, called as ``model(**batch)``). An exported graph
    serves the arguments the example passed, by position or keyword, and no others: a batch with
    ``labels`` the example left out, or a key only ``**kwargs`` takes, would run the model's own
    forward, without the nodes a method inserted (and the root's signature the graph replaces
    would hide ``labels`` from the Trainer's column filter)."""
    try:
        params = inspect.signature(root.forward).parameters.values()
    except (TypeError, ValueError):
        return ""
    return f"{type(root).__name__}.forward takes **kwargs" if any(p.kind is p.VAR_KEYWORD for p in params) else ""


def _export_may_reach_more(tr: TraceResult, matcher: MatchTable, example_inputs) -> bool:
    """Could ``torch.export`` reach sites that module-by-module rewriting misses? Those are calls
    of functions (``F.relu``) in the code of the modules that run their own forward: activation
    modules they call are reached through one-call graphs, everything else through the graphs of
    their children. So: does that code, run once on the example inputs, call a function that a
    rule inserting nodes matches by ``op``? (A rule matching nodes by name alone could match any
    call: then export is tried.)"""
    ops: set[str] = set()
    for r in matcher.rules:
        if r.method is None or r.method.site != "node":
            continue
        if "op" not in r.rule.match:
            if "type" not in r.rule.match:
                return True
            continue
        op = r.rule.match["op"]
        ops |= {o.rstrip("_") for o in ([op] if isinstance(op, str) else op)}
    if not ops:
        return False
    inputs = input_tuple(example_inputs)
    called = own_calls(tr.module, [f.name for f in tr.fallbacks], inputs)
    return called is None or bool(called & ops)
