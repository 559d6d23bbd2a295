"""Where two models that should compute the same function part ways: the module calls whose
outputs differ although everything they called agrees.

``finalize`` compares the finalized model's output with the sparse model's. Rounding differs
between a sparse layer's training path and its plain deployed form (SAS: one wide conv instead of
one conv per slot), by about one float32 ulp. Most models carry that through unchanged, but code
that *selects* (top-k, sort, NMS in a detection model's post-processing) turns it into different
boxes when thousands of candidate scores lie within an ulp of each other, as they do in a
randomly initialised detector. Comparing the final outputs then says nothing about finalize.

:func:`locate_divergence` runs both models once more with hooks on every module call and pairs
the calls by module name and occurrence, comparing what each call got and what it returned (same
``rtol``/``atol`` as the output check). A call *diverges on its own* when it got agreeing inputs
and either its output differs while every call made inside it agrees, or its own code (between
the calls it makes) handed a call inside it differing inputs before any of them diverged. If
each such call runs code that is the same in both models (same class, or a graph with the same
code) on the same parameters and buffers of its own, finalize changed nothing that caused the
difference: inputs that agree within the tolerance went through identical code, which amplified
them. If one of them is code finalize
changed (a finalized layer, an edited graph), that is a real difference and it is named. So is
unchanged code that hands a parameter to an op itself, outside a call of the layer holding it,
when that parameter differs between the models: code around a rewritten layer that reads its
weight (``x @ self.fc.weight.t()`` beside ``self.fc(x)``) computed with the dense weight in the
sparse model and computes with the pruned one in the finalized model (such a read in a graph is
rewired by :mod:`sparsify.prepare.hidden` and not counted).

A call that got differing inputs after an earlier call beside it diverged is downstream of that
one and not judged: whether its own code also changed cannot be told from values that already
differ (a finalized layer behind a detector's top-k gets other boxes either way).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from passes import kept_state
from passes.hooks import is_inlined
from passes.traced import graph_fingerprint, original_class

from sparsify.deploy.compare import flatten_tensors, outputs_close
from sparsify.core.eval_loop import internal
from sparsify.core.param_reads import ParamReads
from sparsify.core.state import find_state

__all__ = ["Divergence", "locate_divergence", "same_code"]


@dataclass
class Divergence:
    """What :func:`locate_divergence` found.

    ``own``: ``(module name, relative difference)`` of every call that diverges on its own, in
    call order ("" is the root). ``changed``: those of them whose code differs between the two
    models. ``reads``: ``(module name, parameter name)`` for each parameter the code of a call in
    ``own`` read directly (outside a call of a module holding it) whose value differs between the
    models. ``agreeing``: how many paired calls agree; ``worst_agreeing``: the largest relative
    difference among the calls inside the ones in ``own``.
    """

    own: list[tuple[str, float]] = field(default_factory=list)
    changed: list[tuple[str, float]] = field(default_factory=list)
    agreeing: int = 0
    worst_agreeing: float = 0.0
    reads: list[tuple[str, str]] = field(default_factory=list)

    @property
    def amplified_only(self) -> bool:
        """True when every call that diverges on its own runs code both models share, on
        parameters that agree."""
        return bool(self.own) and not self.changed and not self.reads


def same_code(a: nn.Module, b: nn.Module, captured: str | None = None) -> bool:
    """Whether ``a`` and ``b`` run the same forward code: the same graph code for two
    ``GraphModule``s (each has its own class), else the same class. A graph ``a`` and the instance
    ``b`` of the class it was traced from that finalize made of it (:func:`passes.traced.untraced`)
    run the same code when ``a``'s graph is still the one captured (digest ``captured``).

    >>> same_code(nn.ReLU(), nn.ReLU()), same_code(nn.ReLU(), nn.GELU())
    (True, False)
    """
    if isinstance(a, fx.GraphModule) and not isinstance(b, fx.GraphModule) and captured is not None:
        return type(b) is original_class(a) and graph_fingerprint(a.graph) == captured
    if isinstance(a, fx.GraphModule) or isinstance(b, fx.GraphModule):
        return isinstance(a, fx.GraphModule) and isinstance(b, fx.GraphModule) and a.code == b.code
    return type(a) is type(b)


class _Calls:
    """Forward pre/post hooks on every module: ``(name, occurrence)`` of each call in call order,
    the call it was made from, and its input and output tensors (cloned: a later in-place op, an
    ``inplace=True`` ReLU on its input, must not change them). ``reads``: the parameters (by
    name) each call's own code handed to an op outside a call of a module holding them, as
    :meth:`watch` records them while the model runs."""

    def __init__(self, model: nn.Module):
        self.parent: dict[tuple[str, int], tuple[str, int] | None] = {}
        self.inputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.reads: dict[tuple[str, int], set[str]] = {}
        self._count: dict[str, int] = {}
        self._stack: list[tuple[str, int]] = []
        self._handles = []
        for name, m in model.named_modules():
            if is_inlined(m):  # never called: a graph runs its code
                continue
            self._handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(), always_call=True))

    def _pre(self, name):
        def hook(module, args, kwargs):
            k = self._count.get(name, 0)
            self._count[name] = k + 1
            key = (name, k)
            self.parent[key] = self._stack[-1] if self._stack else None
            self.inputs[key] = [t.detach().clone() for t in flatten_tensors([args, kwargs])]
            self._stack.append(key)
        return hook

    def _post(self):
        def hook(module, args, out):
            if self._stack:
                key = self._stack.pop()
                self.outputs[key] = [t.detach().clone() for t in flatten_tensors(out)]
        return hook

    def watch(self, model: nn.Module) -> ParamReads:
        """A watcher (to enter while ``model`` runs) that adds each parameter read directly to the
        reads of the call under way."""
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}

        def note(param, func):
            if self._stack:
                self.reads.setdefault(self._stack[-1], set()).add(names[id(param)])
        return ParamReads(model, note)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _differs(source: nn.Module, final: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` holds other values in ``final`` (one it no longer has: unknown, no)."""
    try:
        a, b = source.get_parameter(name), final.get_parameter(name)
    except AttributeError:
        return False
    return not _same_values(a, b)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.detach().to(b.device, b.dtype), b.detach())


def _own_tensors_differ(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``b`` holds other parameters or buffers of its own (not its children's) than ``a``.

    >>> _own_tensors_differ(nn.Linear(2, 2), nn.Linear(2, 2)), _own_tensors_differ(*[nn.Linear(2, 2)] * 2)
    (True, False)
    """
    mine = {**a._parameters, **a._buffers}
    theirs = {**b._parameters, **b._buffers}
    if mine.keys() != theirs.keys():
        return True
    for name, t in mine.items():
        u = theirs[name]
        if (t is None) != (u is None):
            return True
        if t is not None and (t.is_meta or u.is_meta or not _same_values(t, u)):
            return True
    return False


@torch.no_grad()
def locate_divergence(source: nn.Module, final: nn.Module, inputs: tuple, rtol: float = 1e-4,
                      atol: float = 1e-5, captured: dict[str, str] | None = None) -> Divergence:
    """Run both models (eval mode, as they are) on ``inputs`` and find the calls that diverge on
    their own (see the module docstring). Calls are paired by module name and occurrence; calls
    only one model makes (nodes finalize removed) are not compared.

    >>> class Pick(nn.Module):  # selects: a tiny change in its input changes its output
    ...     def __init__(self, w):
    ...         super().__init__(); self.lin = nn.Linear(4, 4, bias=False)
    ...         with torch.no_grad(): self.lin.weight.copy_(w)
    ...     def forward(self, x):
    ...         return self.lin(x).argmax(-1)
    >>> a, b = Pick(torch.eye(4)), Pick(torch.diag(torch.tensor([1 + 1e-6, 1, 1, 1])))
    >>> d = locate_divergence(a, b, (torch.tensor([[1.0, 1.0 + 2e-7, 0, 0]]),))
    >>> d.own, d.amplified_only
    ([('', 1.0)], True)

    ``captured``: the digests of the source's graphs as captured (default: its sparsify state's),
    for :func:`same_code`.
    """
    if captured is None:
        state = find_state(source, required=False)
        captured = state.graph_fingerprints if state is not None else {}
    src, fin = _run(source, inputs), _run(final, inputs)
    smods, fmods = dict(source.named_modules()), dict(final.named_modules())
    paired = [key for key in src.parent if key in src.outputs and key in fin.outputs]  # call order
    got = {key: outputs_close(src.inputs[key], fin.inputs[key], rtol, atol) for key in paired}
    gave = {key: outputs_close(src.outputs[key], fin.outputs[key], rtol, atol) for key in paired}
    pairs = set(paired)
    inside: dict[tuple[str, int] | None, list[tuple[str, int]]] = {}
    for key in paired:
        p = src.parent.get(key)
        while p is not None and p not in pairs:  # a call only one model makes: look through it
            p = src.parent.get(p)
        inside.setdefault(p, []).append(key)
    out = Divergence(agreeing=sum(ok for ok, _ in gave.values()))
    own_keys = []

    def own(key, worst, agreeing_inside):
        own_keys.append(key)
        out.own.append((key[0], worst))
        out.worst_agreeing = max([out.worst_agreeing] + [gave[c][1] for c in agreeing_inside])
        a, b = smods[key[0]], fmods[key[0]]
        # the same class holding other values (a method's finalize_member made a new layer) is changed too
        if not same_code(a, b, captured.get(key[0])) or _own_tensors_differ(a, b):
            out.changed.append((key[0], worst))

    def visit(key):  # a call whose inputs agree
        before, diverged = [], False
        for c in inside.get(key, []):
            if not got[c][0]:
                if not diverged:  # nothing inside diverged yet: the call's own code made the difference
                    own(key, got[c][1], before)
                    diverged = True
            elif not gave[c][0]:
                visit(c)
                diverged = True
            elif not diverged:
                before.append(c)
        if not gave[key][0] and not diverged:
            own(key, gave[key][1], before)

    for key in inside.get(None, []):
        if got[key][0]:
            visit(key)
    if own_keys and not out.changed:  # unchanged code parts the outputs: does it read what finalize changed?
        # a run of its own: watching ops may round differently (another kernel path), and a detector's
        # top-k turns that into other boxes, so the compared runs stay unwatched
        reads = _run(source, inputs, watch=True).reads
        out.reads = [(key[0], p) for key in own_keys for p in sorted(reads.get(key, ())) if _differs(source, final, p)]
    return out


def _run(model: nn.Module, inputs: tuple, watch: bool = False) -> _Calls:
    """The calls of one forward of ``model`` (and with ``watch`` the parameters each call's own code
    read directly), from the random state it had (sparsify/deploy/finalize.py runs both models so)."""
    calls = _Calls(model)
    reads = calls.watch(model) if watch else None
    try:
        with kept_state(model), internal(), reads if watch else contextlib.nullcontext():
            model(*inputs)
    finally:
        calls.remove()
        if reads is not None:
            reads.remove()
    return calls
