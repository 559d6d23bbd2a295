"""A module called more than once is one layer: it is converted for every call or for none.
:func:`_refused_multi_calls` finds those whose calls do not all qualify for the same rewrite, with
why, for the build to leave dense and say so.

Apart from :mod:`sparsify.prepare.build` because it asks each call's method about it before the
build's loop over sites decides any.
"""
from __future__ import annotations

from collections import defaultdict

from sparsify.core.contract import Site


def _is_call(c) -> bool:
    return c.node is not None and c.node.op == "call_module"


def _refused_multi_calls(cands, matcher, root) -> dict[str, str]:
    """Modules called more than once whose rewrite some call does not allow, with why: a module
    is one layer, so it is converted for every call or for none (e.g. SAS rewires a call fed by a
    relu; converting a call that is not would change the output at step 0)."""
    calls = defaultdict(list)
    for c in cands:
        if _is_call(c):
            calls[c.name].append(c)
    refused = {}
    for name, group in calls.items():
        if len(group) < 2:
            continue
        winners = [matcher.winner(c) for c in group]
        if any(w is None or w.method is None for w in winners):
            continue
        if len({(w.rule.index, w.method.name) for w in winners}) > 1:
            refused[name] = (f"called {len(group)} times and the calls match different rules: a layer is "
                             "converted only when every call is converted the same way")
            continue
        for i, (c, w) in enumerate(zip(group, winners), 1):
            why = w.method.accepts(Site(c.name, c.module, c.gm, c.node, c.prefix, root, params=w.rule.params))
            if why:
                refused[name] = (f"called {len(group)} times and call {i} ({c.node.name}) does not qualify "
                                 f"({why}); a layer is converted only when every call does")
                break
    return refused
