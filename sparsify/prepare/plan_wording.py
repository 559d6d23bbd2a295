"""The phrases the plan's warnings and printout are made of: a share of the weights in words, a
misspelt layer type's fix, what an overruled rule means.

Apart from :mod:`sparsify.prepare.plan` because they are plain text from plain values (doctested as
such) and need nothing of the Plan.
"""
from __future__ import annotations

__all__ = ["misspelt_types", "overruled_line", "share_text"]


def misspelt_types(match: dict) -> str:
    """`` (did you mean ...?)`` for ``"type"`` names of a rule's match that differ from a torch.nn
    class name only in case (``"Conv2D"``) or by a module path (``"torch.nn.Conv2d"``, ``"nn.Linear"``:
    types are matched by class name alone): a rule that matches nothing, a run that trains dense.
    Empty otherwise (a model's own class names are matched as given).

    >>> misspelt_types({"type": ["Conv2D", "Linear", "MyBlock", "torch.nn.Linear"]})
    " (did you mean 'Conv2d', 'Linear'?)"
    >>> misspelt_types({"name": "fc"})
    ''
    """
    from torch import nn

    names = match.get("type", [])
    by_lower = {n.lower(): n for n in dir(nn) if isinstance(getattr(nn, n), type)}
    given = [t for t in ([names] if isinstance(names, str) else names) if isinstance(t, str)]
    fixes = [fix for t in given if (fix := by_lower.get(t.rsplit(".", 1)[-1].lower())) is not None and fix != t]
    return f" (did you mean {', '.join(map(repr, fixes))}?)" if fixes else ""


def overruled_line(o: dict, rules=None) -> str:
    """What an entry of :attr:`Plan.overruled_rules` means, in words (``rules``: the recipe's
    resolved rules, to name their methods). Where the later rule matches no more layers than the
    overruled one, nothing says which of the two is the exception: the line states the outcome.

    >>> overruled_line({"rule": 0, "later": 1, "sites": 1, "first": "fc", "broader": True})
    'rule 0 decides nothing: the 1 layer(s) it matches (first: fc) are all matched by rule 1 too, and later rules win'
    >>> overruled_line({"rule": 1, "later": 3, "sites": 1, "first": "fc", "broader": False})
    'rule 1 decides nothing: on this model every layer it matches (1, first: fc) is decided by rule 3, a later rule matching the same layers'
    """
    def named(i):
        return f"rule {i}" if rules is None else f"rule {i} ({rules[i].method or 'null: dense'})"
    if not o.get("broader", True):
        return (f"{named(o['rule'])} decides nothing: on this model every layer it matches ({o['sites']}, first: "
                f"{o['first']}) is decided by {named(o['later'])}, a later rule matching the same layers")
    return (f"{named(o['rule'])} decides nothing: the {o['sites']} layer(s) it matches (first: {o['first']}) are "
            f"all matched by {named(o['later'])} too, and later rules win")


def share_text(share: float) -> str:
    """A share of the model's weights for a warning: never "0%" for some nor "100%" for not all.

    >>> share_text(0.0008), share_text(0.003), share_text(0.25), share_text(0.998), share_text(1.0)
    ('0.08%', '0.3%', '25%', 'over 99%', '100%')
    """
    if 0 < share < 0.005:
        return f"{share * 100:.2g}%"
    return "over 99%" if 0.995 <= share < 1 else f"{share:.0%}"
