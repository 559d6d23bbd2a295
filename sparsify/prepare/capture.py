"""How the model's forward is captured for rewriting: ``torch.fx`` (with module-by-module rewriting
where a submodule cannot be traced) or ``torch.export`` (:mod:`passes.export_capture`), chosen by
``capture`` (``"auto"``, ``"fx"`` or ``"export"``; see docs/capture.md), and what the plan says
about it. A trace is read as candidates in :mod:`sparsify.prepare.capture_candidates`; what the
auto mode weighs before and after trying torch.export is in :mod:`sparsify.prepare.export_choice`.
"""
from __future__ import annotations

import inspect

from torch import nn

from passes import ExportCaptureError, export_trace, trace
from passes.call_inputs import input_tuple
from passes.calls import CallShell
from passes.mode_branches import MODE_KEPT
from passes.tracing import CallRecord, TraceResult

from sparsify.core.activations import is_activation_module, shell_activation
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.prepare.capture_candidates import _candidates, _enclosing, _is_compute, _structural
from sparsify.prepare.export_choice import _export_may_reach_more, _keyword_calls, _reached
from sparsify.prepare.hidden import needed_paths
from sparsify.prepare.matching import Candidate, MatchTable
from sparsify.prepare.open_transformer import close_transformers, open_transformers

__all__ = ["CAPTURES", "capture", "fx_capture", "check_capture", "capture_report", "swaps_only"]

CAPTURES = ("auto", "fx", "export")


def _not_a_layer(name: str, m: nn.Module) -> bool:
    """Trace through ``m``? Not through a weight layer: torch's are leaves anyway, and
    transformers' Conv1D must stay one module call for a method to replace it; nor through an
    embedding (Gemma's scaled one): tied to a rewritten head, it must stay a module that reads
    its weight through ``self.weight`` (sparsify.core.tied); nor through an activation module
    (transformers' GELUActivation...), which rules match by type and name."""
    return not isinstance(m, (*WEIGHT_TYPES, nn.Embedding)) and not is_activation_module(m)


def _takes_labels(root: nn.Module) -> str | None:
    """Why ``root`` is traced child by child when its forward takes labels (transformers'
    convention, as its ``Trainer`` finds them: an argument named ``*label*``, or a question-answering
    head's ``start_positions`` / ``end_positions``, defaulting to None); None otherwise.

    Training calls pass them and inference calls leave them out, and they steer the root's control
    flow (the loss is computed only when they are given). One graph of the root is traced for one
    of the two calls; the other would run the root's own forward, without the nodes a recipe
    inserted (activation regularizers, masks, SAS's rewiring): training and deployment would
    compute different functions. So when the recipe needs nothing of the root's own graph (a
    transformers head: the loss around its backbone's and classifier's calls; see
    :func:`_root_code_needed`), :func:`fx_capture` traces its children instead, each for how the
    root calls it, which is the same in both calls; otherwise the root stays one graph (nothing
    would reach those sites) and a call of the other kind warns that it skips the inserted nodes.

    >>> class Head(nn.Module):
    ...     def forward(self, pixel_values, labels=None):
    ...         return pixel_values
    >>> _takes_labels(Head())[:25]
    'its forward takes labels,'
    """
    try:
        params = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        return None
    qa = "QuestionAnswering" in type(root).__name__
    names = [n for n, p in params.items() if p.default is None
             and ("label" in n or (qa and n in ("start_positions", "end_positions")))]
    if not names:
        return None
    return (f"its forward takes {', '.join(names)}, given in training and left out in inference: traced child by "
            "child, so that both calls run the recipe")


def _root_code_needed(cands: list[Candidate], matcher: MatchTable) -> bool:
    """Whether a rule needs the root's graph for nodes of the root's own code (not a child's): an
    activation a rule matches, a layer whose method inserts nodes after it, any layer or activation
    there when a method reads the nodes around its sites; a weight layer that a method replaces
    module for module is rewritten without the graph."""
    reads_around = any(r.method is not None and r.method.full_trace for r in matcher.rules)
    for c in cands:
        if c.node is None or c.prefix or _enclosing(c) or not _structural(c):
            continue
        if reads_around:
            return True
        w = matcher.winner(c)
        if w is not None and w.method is not None and (
                not isinstance(c.module, WEIGHT_TYPES) or w.method.inserts_after or w.method.site == "node"):
            return True
    return False


def fx_capture(root: nn.Module, matcher: MatchTable, example_inputs=None):
    """torch.fx, as deep as the rules need, untraceable submodules rewritten module by module:
    ``(TraceResult, candidates, candidates of the full-depth trace)``."""
    # children traced under an untraceable parent are specialised to how it calls them
    calls = root_args = None
    if example_inputs is not None:
        calls = CallRecord(root, input_tuple(example_inputs))
        root_args = calls.root_concrete_args() or None  # the root too: traced as the example calls it

    def is_site(name, m):
        # first/last are known only once the trace is done: a compute layer a rule may reach through
        # them is a site for now (a leaf either way), and the rewrite asks the matcher again with its
        # real flags; without this, a rule that only says {"last": true} missed transformers' lm_head
        ends = ((False, False), (True, False), (False, True), (True, True)) if _is_compute(m) else ((False, False),)
        return any((w := matcher.winner(Candidate(name, m, first=f, last=la))) is not None and w.method is not None
                   for f, la in ends)

    # activation modules called by an untraceable parent get a one-call graph when a rule may insert after them
    inserts = any(r.method is not None and (r.method.site == "node" or r.method.full_trace) for r in matcher.rules)
    # torch's transformer layers are leaves of any trace: their activation is reached only on their regular path
    opened = open_transformers(root) if inserts else []
    shell = shell_activation if any(r.method is not None and r.method.site == "node" for r in matcher.rules) else None
    if shell is not None and calls is not None and (ran := calls.call_order()):
        # one the example forward never called gets none: Mamba hands its act to a kernel by name, so a
        # shell there would never run, its penalty stay 0, and every step blame the training loop
        shell = lambda name, m: shell_activation(name, m) and name in ran  # noqa: E731
    # a method that reads across an activation (SAS: the relu's input) keeps a module whose forward
    # branches on self.training around it out of the graph: inlined, the graph would hold the training
    # branch and the layers rewired past the relu would read its input in training only
    full = any(r.method is not None and r.method.full_trace for r in matcher.rules)
    wraps = shell or (shell_activation if full else None)
    tr = trace(root, _not_a_layer, is_site=is_site, calls=calls, shell=shell, concrete_args=root_args, wraps=wraps)
    cands = _candidates(tr, root, calls)
    split = _takes_labels(root)
    if split is not None and "" in tr.graphs and not _root_code_needed(cands, matcher):
        # every site the root's own code holds is a layer a module swap rewrites: tracing the
        # children instead loses nothing
        tr.restore()
        tr = trace(root, _not_a_layer, is_site=is_site, calls=calls, shell=shell, concrete_args=root_args, split=split,
                   wraps=wraps)
        cands = _candidates(tr, root, calls)
    else:
        split = None
    # a method whose rewrite reads the nodes around a site (SAS: the relu feeding a layer, which may
    # sit inside a module with nothing to rewrite) needs every module holding a layer or an
    # activation traced through; modules with neither (stochastic depth) still stay leaves
    descended, needed = set(), set()
    for c in cands:
        # a graph traced below an untraceable parent (fallback) is reached through its own path
        paths = _enclosing(c) + [c.prefix.rsplit(".", k)[0] for k in range(c.prefix.count(".") + 1) if c.prefix]
        if c.node is None:  # swapped as an attribute inside fallbacks: the retrace must reach it again
            paths += [c.name.rsplit(".", k)[0] for k in range(1, c.name.count(".") + 1)]
        descended.update(paths)
        w = matcher.winner(c)
        if (w is not None and w.method is not None) or (full and _structural(c)):
            needed.update(paths)
    needed |= needed_paths(tr.graphs, matcher.winner)  # forwards that read a rewritten weight
    for f in tr.fallbacks:
        if f.chosen and f.reason == MODE_KEPT:
            # traced into again, so that the retrace keeps it running as it is for the same reason (a plain
            # leaf would do the same, but the plan would not say why the layer after it stays dense)
            needed.update(f.name.rsplit(".", k)[0] for k in range(f.name.count(".") + 1))
    if descended <= needed:
        _note_opened(tr, opened)
        return tr, cands, cands
    first_cands, ends = cands, tr.ends
    tr.restore()  # below untraceable modules, the second trace starts from the modules, not the first graphs
    # an opened layer with nothing a rule reaches gets torch's class (and its fused inference path) back
    opened = [n for n in opened if n not in close_transformers(root, [n for n in opened if n not in needed])]
    tr = trace(root, lambda name, m: name in needed and _not_a_layer(name, m), is_site=is_site, calls=calls,
               shell=shell, concrete_args=root_args, split=split, wraps=wraps)
    # first/last describe the model, not how deep this trace went (a leaf stem hides its conv):
    # the full-depth trace saw more of it
    tr.ends = ends
    _note_opened(tr, opened)
    return tr, _candidates(tr, root), first_cands


def _note_opened(tr: TraceResult, opened: list[str]) -> None:
    if opened:
        tr.notes.append(f"torch transformer modules traced on their regular path (torch.fx keeps them whole), so "
                        f"that rules reach their activations: {', '.join(n or '<root>' for n in opened[:4])}"
                        f"{'...' if len(opened) > 4 else ''} (docs/capture.md#torch-transformer-layers)")


def check_capture(value) -> str:
    """``value`` when it is a capture mode, else a one-line ``ValueError`` saying which are.

    >>> check_capture("export")
    'export'
    >>> check_capture("onnx")
    Traceback (most recent call last):
    ValueError: capture='onnx' is not a capture mode: use "auto" (torch.fx, torch.export where that reaches more), "fx" or "export" (needs example_inputs)
    """
    if value not in CAPTURES:
        raise ValueError(f"capture={value!r} is not a capture mode: use \"auto\" (torch.fx, torch.export where "
                         "that reaches more), \"fx\" or \"export\" (needs example_inputs)")
    return value
def swaps_only(matcher: MatchTable) -> bool:
    """Whether every rule of ``matcher`` only swaps Conv/Linear modules (the weight methods): then
    module-by-module rewriting reaches every site a graph would, and code torch.fx could not trace
    loses nothing worth a warning (the plan still lists it).

    >>> from sparsify.prepare.recipe import load_recipe
    >>> from sparsify.methods import get_method
    >>> [swaps_only(MatchTable(load_recipe(r).rules, get_method)) for r in ("st3", "dual", "sas")]
    [True, False, False]
    """
    return all(r.method is None or (r.method.site == "module" and not r.method.full_trace
                                    and not r.method.inserts_after) for r in matcher.rules)


def capture(root: nn.Module, matcher: MatchTable, example_inputs=None, mode: str = "auto"):
    """Capture ``root`` for rewriting: ``(TraceResult, candidates, full-depth candidates)``.

    ``"fx"``: :func:`fx_capture`. ``"export"``: ``torch.export`` on ``example_inputs`` (required),
    with a one-line error when it cannot capture the model. ``"auto"``: ``torch.fx``; only where it
    fell back to module-by-module rewriting, ``example_inputs`` were given and a rule inserts nodes
    after activations (which module-by-module rewriting reaches only as activation modules, not as
    functional calls) is ``torch.export`` tried, and its graph used when it reproduces the model in
    eval mode and more sites are reached through it. ``TraceResult.notes`` says why.
    """
    mode = check_capture(mode)
    if mode == "export":
        if example_inputs is None:
            raise ValueError('capture="export" runs the forward on example inputs: pass example_inputs=... '
                             "(a tensor or a tuple of the forward's positional inputs)")
        try:
            tr = export_trace(root, example_inputs)
        except ExportCaptureError as e:
            raise ValueError(f"sparsify: {e}; use capture=\"fx\" (module-by-module rewriting where torch.fx "
                             "cannot trace)") from None
        cands = _candidates(tr, root)
        return tr, cands, cands
    tr, cands, first = fx_capture(root, matcher, example_inputs)
    if mode == "fx" or all(f.chosen for f in tr.fallbacks):  # export would trace a split root whole again
        return tr, cands, first
    if example_inputs is None or not any(r.method is not None and r.method.site == "node" for r in matcher.rules):
        return tr, cands, first
    if why := _keyword_calls(root):
        tr.notes.append(f"auto: {why}: an exported graph serves calls with the example's arguments only, and "
                        "model(**batch) passes others (labels, keys only **kwargs takes); kept torch.fx with "
                        "module-by-module rewriting")
        return tr, cands, first
    if not _export_may_reach_more(tr, matcher, example_inputs):
        tr.notes.append("auto: the code torch.fx could not trace calls no function a rule inserts after; kept "
                        "torch.fx with module-by-module rewriting")
        return tr, cands, first
    try:
        ex = export_trace(root, example_inputs)
    except ExportCaptureError as e:
        tr.notes.append(f"auto: {e}; kept torch.fx with module-by-module rewriting")
        return tr, cands, first
    ex_cands = _candidates(ex, root)
    if ex.notes or _reached(ex_cands, matcher) <= _reached(cands, matcher):
        why = ex.notes[0] if ex.notes else "it reaches no more sites"
        tr.notes.append(f"auto: torch.export captured the model but {why}; kept torch.fx")
        return tr, cands, first  # export_trace changed nothing in root's modules
    ex.notes.append(f"auto: torch.fx could not trace {', '.join(f.name or '<root>' for f in tr.fallbacks[:3])}"
                    f"{'...' if len(tr.fallbacks) > 3 else ''}; torch.export reaches "
                    f"{_reached(ex_cands, matcher)} sites instead of {_reached(cands, matcher)}")
    return ex, ex_cands, ex_cands


def capture_report(tr: TraceResult) -> list[dict]:
    """One ``{"name", "capture", "note"}`` per captured (sub)module, for the plan: which of
    ``torch.fx``, ``torch.export`` or module-by-module rewriting (an untraceable submodule run
    as it is) reached the layers under it."""
    out = []
    how = "torch.export" if tr.capture == "export" else "torch.fx"
    for prefix in tr.graphs:
        if isinstance(tr.graphs[prefix], CallShell):
            continue  # one activation module called by an untraceable parent
        out.append({"name": prefix, "capture": how, "note": ""})
    for f in tr.fallbacks:
        out.append({"name": f.name, "capture": "module by module", "note": f.reason})
    return out
