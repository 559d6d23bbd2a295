"""Turning a rule's ``match`` block into a predicate over candidate sites."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from passes import compile_glob, is_depthwise, is_grouped, kernel_size_in

from sparsify.core.activations import activation_kind
from sparsify.core.contract import Site
from sparsify.core.conv1d import is_conv1d

__all__ = ["Candidate", "MatchTable", "compile_match", "op_name", "block_hint"]


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
    """``relu`` for ``F.relu`` / ``torch.relu`` / ``x.relu()`` / ``aten.relu.default``; None for
    other node kinds.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> op_name(g.call_function(torch.ops.aten.relu_.default, (x,))), op_name(g.call_method("relu", (x,)))
    ('relu', 'relu')
    """
    if node is None:
        return None
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):  # a torch.export graph: aten.relu.default
            return node.target._opname.rstrip("_")
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
    names = [compile_glob(p) for p in _as_list(match["name"])] if "name" in match else None
    not_names = [compile_glob(p) for p in _as_list(match["not_name"])] if "not_name" in match else []
    kernel = kernel_size_in(match["kernel_size"]) if "kernel_size" in match else None

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
        if "grouped" in match and is_grouped(c.node, m) != match["grouped"]:
            return False
        if "depthwise" in match and is_depthwise(c.node, m) != match["depthwise"]:
            return False
        if kernel is not None and not kernel(c.node, m):
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


@dataclass
class CompiledRule:
    rule: object  # sparsify.prepare.recipe.Rule
    pred: object  # Candidate -> bool
    method: object  # Method or None


def _matched_not_taken(r, c: Candidate) -> bool:
    """Whether compiled rule ``r`` matches ``c`` but its (module-swapping) method does not take the
    module's type (SAS and a Conv1D, st3 and a ReLU)."""
    return (r.method is not None and r.method.site == "module" and c.module is not None
            and not isinstance(c.module, r.method.targets) and r.pred(c))


class MatchTable:
    """Which rule wins each candidate: computed once per candidate and kept, so the trace, the
    rewrite, the plan and the dense reasons all read the same answer. Queries change nothing
    (the table is a cache); :meth:`unmatched` lists the rules no candidate looked up matched.

    >>> from sparsify.prepare.recipe import load_recipe
    >>> from sparsify.methods import get_method
    >>> table = MatchTable(load_recipe("st3").rules, get_method)
    >>> table.winner(Candidate("conv", nn.Conv2d(1, 1, 1))).rule.index, table.unmatched()
    (0, [])
    """

    def __init__(self, rules, get_method):
        self.rules = [CompiledRule(r, compile_match(r.match), get_method(r.method) if r.method else None)
                      for r in rules]
        # keyed by identity; each entry keeps its candidate alive so that no id is reused
        self._table: dict[tuple, tuple[CompiledRule | None, tuple[int, ...], Candidate]] = {}

    def _entry(self, c: Candidate):
        key = (c.name, id(c.module), id(c.node), c.first, c.last)
        entry = self._table.get(key)
        if entry is None:
            hits = tuple(r for r in self.rules if self._applies(r, c))
            entry = self._table[key] = (hits[-1] if hits else None, tuple(r.rule.index for r in hits), c)
        return entry

    @staticmethod
    def _applies(r: CompiledRule, c: Candidate) -> bool:
        # a rule with a module method only matches its targets; a node method needs a graph node
        if r.method is not None and r.method.site == "module" and not isinstance(c.module, r.method.targets):
            return False
        if r.method is not None and r.method.site == "node" and c.node is None:
            return False
        return bool(r.pred(c))

    def winner(self, c: Candidate) -> CompiledRule | None:
        """The last rule that matches ``c``, or None."""
        return self._entry(c)[0]

    def overridden(self, c: Candidate) -> list[int]:
        """Indices of the rules with a method that match ``c`` before the one that wins it."""
        winner, matched, _ = self._entry(c)
        return [i for i in matched if winner is not None and i < winner.rule.index
                and self.rules[i].method is not None]

    def taken_before(self, c: Candidate, root: nn.Module) -> int | None:
        """The last rule before ``c``'s winner whose method would have rewritten ``c``, or None."""
        for i in reversed(self.overridden(c)):
            rule = self.rules[i]
            if not rule.method.accepts(Site(c.name, c.module, c.gm, c.node, c.prefix, root, params=rule.rule.params)):
                return i
        return None

    def refused(self, c: Candidate) -> str | None:
        """Why the last rule that would match ``c`` but whose method does not take its module
        type (SAS and a Conv1D) skipped it, for the plan; None when there is no such rule."""
        found = self.refusal(c)
        return None if found is None else found[0]

    def refusal(self, c: Candidate) -> tuple[str, int] | None:
        """:meth:`refused`'s reason with the index of that rule."""
        found = None
        for r in self.rules:
            if _matched_not_taken(r, c):
                found = (f"{r.method.accepts(Site(c.name, c.module))} (rule {r.rule.index})", r.rule.index)
        return found

    def untaken(self, index: int) -> str:
        """`` (it matched 1 module st3 does not take, ReLU: ...)`` for rule ``index`` whose match
        holds for candidates its weight method does not rewrite (``{"type": "ReLU"}`` with st3):
        why it matched nothing. Empty when there are none.

        >>> from sparsify.prepare.recipe import load_recipe
        >>> from sparsify.methods import get_method
        >>> rules = load_recipe({"version": 1, "rules": [{"match": {"type": "ReLU"}, "method": "sas"}]}).rules
        >>> table = MatchTable(rules, get_method)
        >>> table.winner(Candidate("relu", nn.ReLU())), table.untaken(0)
        (None, ' (it matched 1 module sas does not take, ReLU: sas applies to Conv1d, Conv2d, Conv3d, Linear only)')
        """
        r = self.rules[index]
        seen = {id(c.module): c for _, _, c in self._table.values() if _matched_not_taken(r, c)}
        if not seen:
            return ""
        first = next(iter(seen.values()))
        kinds = ", ".join(sorted({c.kind for c in seen.values()}))
        return (f" (it matched {len(seen)} module{'s' if len(seen) > 1 else ''} {r.method.name} does not take, "
                f"{kinds}: {r.method.accepts(Site(first.name, first.module))})")

    def unmatched(self, graphs=None) -> list[int]:
        """Indices of the rules that matched none of the candidates looked up so far. ``graphs``:
        the graph modules the capture kept; a node a method inserts at (an activation) in a graph
        not among them (traced, then given up for a module running its own forward) does not count,
        since nothing was inserted there.

        >>> from sparsify.prepare.recipe import load_recipe
        >>> from sparsify.methods import get_method
        >>> gm = torch.fx.symbolic_trace(nn.ReLU())
        >>> table = MatchTable(load_recipe("tl1").rules, get_method)
        >>> relu = next(n for n in gm.graph.nodes if n.op == "call_function")
        >>> _ = table.winner(Candidate("relu", None, relu, gm))
        >>> table.unmatched(), table.unmatched(graphs=[gm]), table.unmatched(graphs=[])
        ([], [], [0])
        """
        hit = {i for i, lost, _ in self._hits(graphs) if not lost}
        return [r.rule.index for r in self.rules if r.rule.index not in hit]

    def lost(self, index: int, graphs) -> str:
        """`` (it matched silu in a.norm, ...: ...)`` for rule ``index`` when its only matches were
        nodes of graphs the capture gave up (:meth:`unmatched`): why it matched nothing."""
        where = sorted({c.prefix or "<root>" for i, lost, c in self._hits(graphs) if i == index and lost})
        if not where:
            return ""
        return (f" (its matches were in {', '.join(where[:3])}{', ...' if len(where) > 3 else ''}, which torch.fx "
                "traced and then gave up: they run their own forward, with no node to insert at; see the plan's "
                "'untraceable' lines)")

    def _hits(self, graphs):
        # (rule index, lost, candidate) for every match; lost: a node a method inserts at, outside ``graphs``
        kept = None if graphs is None else {id(g) for g in graphs}
        for _, matched, c in self._table.values():
            gone = kept is not None and c.node is not None and id(c.gm) not in kept
            for i in matched:
                yield i, gone and self.rules[i].method is not None and self.rules[i].method.site == "node", c

    def overruled(self) -> list[dict]:
        """The rules that matched candidates but decide none of them, because one later rule
        matches every one of them too (later rules win): an exception written before the broad
        rule it means to narrow, or a rule given twice. ``{"rule", "later", "sites", "first",
        "broader"}`` each: ``later`` the last such rule, ``sites`` how many candidates, ``first``
        one's name, ``broader`` whether ``later`` also matches candidates the rule does not (false:
        on this model both match the same ones, as an exception can the only layer of a type).

        A broad rule that narrower later rules overrule between them (the usual shape, broad
        rule first, then exceptions) is not listed: each of those matches only part of it.

        >>> from sparsify.prepare.recipe import load_recipe
        >>> from sparsify.methods import get_method
        >>> rules = load_recipe({"version": 1, "rules": [{"match": {"name": "fc"}, "method": None},
        ...     {"match": {"type": "Linear"}, "method": "st3"}]}).rules
        >>> table = MatchTable(rules, get_method)
        >>> table.winner(Candidate("fc", nn.Linear(1, 1))).rule.index, table.overruled()
        (1, [{'rule': 0, 'later': 1, 'sites': 1, 'first': 'fc', 'broader': False}])
        """
        sites: dict[int, list[str]] = {}
        won = set()
        for winner, matched, c in self._table.values():
            won.add(winner.rule.index if winner is not None else None)
            for i in matched:
                names = sites.setdefault(i, [])
                if c.name not in names:
                    names.append(c.name)
        out = []
        for i, names in sorted(sites.items()):
            if i in won:
                continue
            covering = [j for j in sites if j > i and set(sites[j]) >= set(names)]
            if covering:
                later = max(covering)
                out.append({"rule": i, "later": later, "sites": len(names), "first": names[0],
                            "broader": len(set(sites[later])) > len(set(names))})
        return out


def block_hint(match: dict, root: nn.Module) -> str:
    """`` (... matches a block, not a layer: ...)`` for a ``name`` glob of a rule that matched
    nothing where it names a module holding layers (``"layer1"``): the glob for what it holds
    is ``layer1.**``. Empty otherwise.

    >>> block_hint({"name": "layer1"}, nn.ModuleDict({"layer1": nn.Sequential(nn.Conv2d(1, 1, 1))}))
    " ('layer1' matches the block layer1, not a layer: 'layer1.**' matches what it holds)"
    """
    if "name" not in match:
        return ""
    hints = []
    for pattern in _as_list(match["name"]):
        glob = compile_glob(pattern)
        blocks = [name for name, m in root.named_modules() if name and glob.fullmatch(name)
                  and next(m.children(), None) is not None]
        if blocks:
            more = f" (and {len(blocks) - 1} more)" if len(blocks) > 1 else ""
            hints.append(f"{pattern!r} matches the block {blocks[0]}{more}, not a layer: "
                         f"{pattern + '.**'!r} matches what it holds")
    return f" ({'; '.join(hints)})" if hints else ""
