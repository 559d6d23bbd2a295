"""From (model, recipe) to a rewritten model and its plan.

Two traces at most: a full-depth one to find what the rules select, then, only if some traced
submodule holds nothing to rewrite, one that keeps exactly those submodules as leaves (so their
``self.training`` branches stay live: stochastic depth still switches off in ``eval()``).
"""
from __future__ import annotations

import itertools
import warnings
from collections import defaultdict

from torch import nn

from passes import PassResult, Pipeline
from passes.hooks import guard_graphs, kept_hooks
from passes.traced import deepcopy_module, graph_fingerprint

from sparsify.prepare.capture import capture, capture_report, check_capture, swaps_only
from sparsify.prepare.capture_warnings import _note_export_calls, _note_training_only, tracing_summary
from sparsify.prepare.dense import dense_entries
from sparsify.prepare.direct_reads import direct_reads, direct_warning
from sparsify.prepare.hidden import convert_hidden, hidden_candidates, hidden_positions, hidden_reads, rewire_hidden_reads
from sparsify.prepare.hidden_positions import unreached, watched_names
from sparsify.prepare.inputs import guess_example_inputs, positions_per_sample
from sparsify.prepare.model_checks import check_model
from sparsify.prepare.matching import MatchTable, block_hint
from sparsify.prepare.multi_calls import _is_call, _refused_multi_calls
from sparsify.prepare.no_gradient import FROZEN_BEFORE, frozen_before, frozen_before_warning
from sparsify.methods import get_method
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.modes import modes_of, restore_modes
from sparsify.core.contract import GroupContext, Site
from sparsify.prepare.plan import Plan
from sparsify.prepare.plan_entry import PlanEntry
from sparsify.prepare.tied import module_aliases, param_owners, point_aliases, share_tied, tie_decision
from sparsify.prepare.adapters import adapter_reason, is_tuner_layer
from sparsify.prepare.pretrained import guard_save_pretrained
from sparsify.prepare.unhandled import frozen_reason, unhandled_entries
from sparsify.prepare.recipe import Recipe
from sparsify.prepare.undo import TreeSnapshot, mirror_children
from sparsify.prepare.validate import check_times
from sparsify.prepare.effective_check import check_effective_weights
from sparsify.prepare.written import step_zero_writes
from sparsify.core.forwards import watch_forwards
from sparsify.core.load_hooks import before_load
from sparsify.core.state import STATE_ATTR, SparsifyState, after_load, start_groups
from sparsify.core.step_checks import group_messages

__all__ = ["build", "check_model"]


def copy_structure(model: nn.Module, share_tensors: bool = True) -> nn.Module:
    """A copy of ``model``'s module tree; with ``share_tensors`` its parameters and buffers are the
    caller's own tensors (no weight is copied), as ``torch.fx.symbolic_trace`` and ``prepare_qat_fx``
    share them, so a rewrite can swap and configure modules without touching the caller's.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> c = copy_structure(m)
    >>> c[0] is m[0], c[0].weight is m[0].weight
    (False, True)
    """
    memo = kept_hooks(model)  # the caller's hook objects run in the copy, not copies of them
    if share_tensors:
        for t in itertools.chain(model.parameters(), model.buffers()):
            memo[id(t)] = t
    return deepcopy_module(model, memo)  # a PEFT wrapper around a traced model stays the wrapper


def build(model: nn.Module, recipe: Recipe, *, example_inputs=None, total_steps: int | None = None,
          inplace: bool = False, copy: bool = False, dry_run: bool = False, factors: dict | None = None,
          capture: str | None = None):
    """Capture, match, rewrite. Returns ``(root, plan)``; ``root`` carries a SparsifyState unless
    ``dry_run``. ``model``'s modules are never changed unless ``inplace``; its parameter and buffer
    tensors are shared with ``root`` unless ``copy`` (see :func:`sparsify.sparsify`). ``factors``:
    :func:`~sparsify.prepare.inputs.positions_per_sample` of ``model`` on ``example_inputs``, when the
    caller measured them (qualified names survive the rewrite, so they hold for ``root``). ``capture``:
    how the forward is captured (:func:`~sparsify.prepare.capture.capture`; default: the recipe's
    ``options.capture``, else ``"auto"``)."""
    check_model(model)
    capture = check_capture(capture or recipe.options.get("capture", "auto"))
    if inplace and copy:
        raise ValueError("sparsify: inplace=True rewrites the caller's model and copy=True copies it; pick one")
    check_times(recipe, get_method, total_steps, require=not dry_run)  # before anything is touched
    if not inplace:
        caller = None if copy else {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
        return _build(copy_structure(model, share_tensors=not copy), recipe, example_inputs, total_steps, dry_run,
                      factors, capture, caller=caller)
    snapshot = TreeSnapshot(model)
    try:
        root, plan = _build(model, recipe, example_inputs, total_steps, dry_run, factors, capture, inplace=True)
    except BaseException:
        snapshot.restore()  # a failed sparsify leaves the caller's model as it was
        raise
    if root is not model and not dry_run:
        mirror_children(model, root)
    return root, plan



def _build(root: nn.Module, recipe: Recipe, example_inputs, total_steps: int | None, dry_run: bool,
           measured: dict | None, mode: str = "auto", caller: set[int] | None = None, inplace: bool = False):
    """:func:`build` on ``root`` (``caller``: ids of the caller's model's tensors it shares;
    ``inplace``: ``root`` is the caller's model)."""
    modes = modes_of(root)
    root.train()  # both captures record the training forward
    matcher = MatchTable(recipe.rules, get_method)
    tr, cands, first_cands = capture(root, matcher, example_inputs, mode)
    root = tr.module
    # each graph as captured: finalize gives a graph that ends the same its module's own class back
    fingerprints = {prefix: graph_fingerprint(gm.graph) for prefix, gm in tr.graphs.items()}

    plan = Plan(recipe=recipe.name)
    plan.has_adapters = any(is_tuner_layer(m) for m in root.modules())
    plan.captures = capture_report(tr)
    plan.capture_notes = list(tr.notes)
    plan.fallbacks = [{"name": f.name, "reason": f.reason, "chosen": f.chosen} for f in tr.fallbacks]
    plan.trace_warnings = list(tr.warnings)
    summary = tracing_summary([] if swaps_only(matcher) else tr.fallbacks, tr.warnings)
    if summary and not dry_run:
        warnings.warn(summary, stacklevel=3)
    members: dict[int, dict[str, nn.Module]] = defaultdict(dict)
    changes_by_graph = defaultdict(list)
    rewritten = set()
    plan_warned: set[str] = set()
    no_gradient: list[str] = []  # regularized activations only frozen layers compute
    frozen_nodes: set = set()  # graph nodes only frozen layers compute, found so far
    called = {c.name for c in cands if c.node is not None and c.node.op == "call_module"}
    hidden, swaps = hidden_candidates(root, tr.graphs, matcher.winner, called=called)
    if not dry_run:
        changes_by_graph[""].extend(convert_hidden(root, swaps, [c.name for c in hidden]))
    refused = _refused_multi_calls(cands, matcher, root)
    # called or not: code that also reads a called layer's weight computes with the dense one there
    watched = {c.name for c in cands if measured is not None and c not in hidden
               and isinstance(c.module, WEIGHT_TYPES) and getattr(matcher.winner(c), "method", None) is not None}
    direct = direct_reads(root, sorted(watched), example_inputs)  # Mamba's dt_proj.weight @ x
    owners, aliases = param_owners(root), module_aliases(root)
    rewritten_as: dict[int, str] = {}  # a module under several names -> the name it was rewritten at
    tied_users: dict[str, str] = {}  # module -> the rewritten layer whose weight it reads
    deciding = {c.name: w.rule for c in cands + hidden if (w := matcher.winner(c)) is not None}
    for c in cands + hidden:
        w = matcher.winner(c)
        if w is None or w.method is None:
            continue
        site = Site(c.name, c.module, c.gm, c.node, c.prefix, root, params=w.rule.params)
        why = refused.get(c.name) if _is_call(c) else None
        if why and not dry_run and c.name not in plan_warned:
            plan_warned.add(c.name)
            warnings.warn(f"sparsify: {c.name} stays dense: {why}", stacklevel=3)
        why = why or direct.get(c.name) or w.method.accepts(site)
        # declined here, though an earlier rule's method would take it: it stays dense, said (Plan.shadowed)
        if why and (earlier := matcher.taken_before(c, root)) is not None:
            plan.shadowed.append({"name": c.name, "rule": w.rule.index, "earlier": earlier, "reason": why})
        weight_params = c.module.weight.numel() if isinstance(c.module, WEIGHT_TYPES) else 0
        if c.name in tied_users:  # counted once, with the layer owning the mask
            why, weight_params = f"tied to {tied_users[c.name]}: computes with its effective weight (one mask)", 0
        if rewritten_as.get(id(c.module), c.name) != c.name:  # one module registered under two names
            why, weight_params = f"the same module as {rewritten_as[id(c.module)]}: sparsified there (one layer)", 0
        users = []
        if not why and weight_params:
            why = adapter_reason(root, c.name, recipe.options) or frozen_reason(c.module, recipe.options)
            why, users = (why, []) if why else tie_decision(root, c.name, c.module, w.method, recipe.options, owners,
                                                            dry_run=dry_run, rule=w.rule, rules=deciding)
        if why:
            plan.entries.append(PlanEntry(c.name, c.kind, None, w.rule.index, why, weight_params))
            continue
        # a tie shares the mask: the other module (an input embedding) gets the same zeros, said in the plan
        note = f"weight shared with {', '.join(users)}: one mask, the zeros reach both" if users else ""
        regularized = getattr(w.method, "_regularized_node", None)  # an activation regularizer's node
        if regularized and frozen_before(c.gm, regularized(site, w.rule.params["placement"]), c.prefix == "",
                                         frozen_nodes):
            note = FROZEN_BEFORE
            no_gradient.append(c.name)
        plan.entries.append(PlanEntry(c.name, c.kind, w.rule.method, w.rule.index, note, weight_params))
        rewritten.add(c.name)
        if id(c.module) in aliases:
            rewritten_as.setdefault(id(c.module), c.name)
        tied_users.update(dict.fromkeys(users, c.name))
        if not dry_run:
            w.method.apply(site, w.rule.params)
            if not site.members:  # a user's apply that neither replaced nor inserted: the site would stay as it was
                raise RuntimeError(f"method {w.method.name!r}: apply() gave {c.name} no module (neither site.replace "
                                   "nor site.insert_after): every site a method accepts must be rewritten through "
                                   "them; decline it in accepts() instead")
            share_tied(root, c.name, users)
            members[w.rule.index].update(site.members)
            changes_by_graph[c.prefix].extend(site.changes)
    if direct and not dry_run:
        warnings.warn(direct_warning(direct), stacklevel=3)
    if no_gradient and not dry_run:
        warnings.warn(frozen_before_warning(no_gradient), stacklevel=3)
    if not dry_run:
        point_aliases(root, {i: root.get_submodule(name) for i, name in rewritten_as.items()})
        for prefix, ch in rewire_hidden_reads(tr.graphs, rewritten).items():
            changes_by_graph[prefix].extend(ch)
    listed = {e.name for e in plan.entries}  # sites a method refused are listed already, with its reason
    plan.entries.extend(e for e in dense_entries(root, tr, first_cands, matcher, rewritten) if e.name not in listed)
    plan.entries.extend(e for e in unhandled_entries(root, tr.graphs) if e.name not in listed)
    plan.unmatched_rules = matcher.unmatched(graphs=list(tr.graphs.values()))
    plan.optional_rules = [r.index for r in recipe.rules if recipe.data["rules"][r.index].get("optional")]
    # a name naming a block says what to write instead; else the modules the rule's method did not take
    plan.unmatched_hints = {i: h for i in plan.unmatched_rules
                            if (h := block_hint(recipe.rules[i].match, root) or matcher.untaken(i)
                                  or matcher.lost(i, tr.graphs.values()))}
    plan.overruled_rules = matcher.overruled()

    for prefix, gm in tr.graphs.items():
        changes = changes_by_graph.get(prefix, [])
        # swapping the module a node calls leaves the graph's code as it is: no recompile needed
        Pipeline([lambda g, ch=changes: PassResult(g, any(c.kind != "replace" for c in ch), ch)]).run(gm)
    if not dry_run:
        _note_training_only(root, plan)
        if mode == "export":  # auto exports no forward taking **kwargs
            _note_export_calls(root, plan)

    # a guessed input costs a full forward at 224²: only the dry run and methods that size
    # buffers at build time pay it now; sparsify() guesses on first use (report, finalize)
    guess_now = dry_run or any(get_method(r.method).needs_example_inputs
                               for r in recipe.rules if r.method and r.index in members)
    guessed = example_inputs is None
    if example_inputs is None:
        example_inputs = guess_example_inputs(root) if guess_now else None
    elif isinstance(example_inputs, (list, tuple)):
        example_inputs = tuple(example_inputs)
    else:
        example_inputs = (example_inputs,)
    # rewritten layers read outside module calls, and those left dense (their get_attr reads remain)
    hidden_names = list(dict.fromkeys([c.name for c in hidden] + [n for n, _, _ in hidden_reads(tr.graphs)]))
    # MAC factors: measured by the forward that checked the caller's example_inputs, or by the dry
    # run now; else sparsify() leaves them to the first report() (a forward costs more than the
    # trace), as it does when a layer needs a watched forward of its own: weights read outside
    # module calls, MultiheadAttention projections, layers no module hook saw (a leaf module may
    # multiply their weights itself)
    factors = dict(measured) if measured is not None else None
    if factors is None and dry_run:
        factors = positions_per_sample(root, example_inputs) if example_inputs is not None else {}
    watched = watched_names(root, hidden_names + unreached(root, factors or {}))
    if watched and not dry_run:
        factors = None
    elif watched and example_inputs is not None:
        factors.update(hidden_positions(root, example_inputs, watched))
    if example_inputs is not None:
        plan.input_shapes = [list(x.shape) for x in example_inputs if hasattr(x, "shape")]
        for e in plan.entries if factors else ():
            # a dense MultiheadAttention's projection weights are counted as "<mha>.in_proj", "<mha>.q_proj"...
            key = e.name[:-len("_weight")] if e.name.endswith(
                (".in_proj_weight", ".q_proj_weight", ".k_proj_weight", ".v_proj_weight")) else e.name
            if e.params and key in factors:
                e.macs = int(round(factors[key] * e.params))
    restore_modes(root, modes)  # a frozen BatchNorm stays frozen (core/modes.py)
    if dry_run:
        return root, plan

    guard_graphs(tr.graphs)  # a hook registered later on a module whose code a graph runs: a warning
    state = SparsifyState(recipe.to_json(), total_steps, list(tr.graphs))
    state.graph_fingerprints = fingerprints
    ctx = GroupContext(root=root, total_steps=total_steps, stages=recipe.stages, example_inputs=example_inputs,
                       guessed=guessed)
    for rule in recipe.rules:
        if rule.index in members:
            method = get_method(rule.method)
            state.groups[f"rule{rule.index}_{method.name.replace('-', '_')}"] = method.make_group(
                rule.params, members[rule.index], ctx)
    state.plan = plan
    state.example_inputs = example_inputs
    state.guess_inputs_later = guessed and example_inputs is None
    state.hidden_names = hidden_names
    state.output_layers = [c.name for c in cands + hidden if c.last and c.name in rewritten]
    # (a PEFT model's frozen base layers are what its adapters mean: they stay frozen)
    state.frozen_dense = [] if plan.has_adapters else [e.name for e in plan.frozen_matched(recipe)]
    state.layer_factors = factors
    if no_gradient:  # said above: sparsify.step need not say it again
        state.warned.add("penalty-constant")
    root.add_module(STATE_ATTR, state)
    root.register_load_state_dict_pre_hook(before_load)  # before any layer takes another run's values
    root.register_load_state_dict_post_hook(after_load)
    guard_save_pretrained(root)
    for m in state.members():
        watch_forwards(m)  # a method's own module or kept plain layer: refuse retracing, note forwards
    # step 0 writes copies of the caller's tensors, or under inplace its own, put back if refused after
    with step_zero_writes(root, state.groups.values(), caller, inplace):
        start_groups(state)
        check_effective_weights(state.groups.values())  # a method of the user's: its layers' weights fit
        # checked here, not when sparsify() says them: a refused one must find the caller's model restored
        state.build_said = [m for g in state.groups.values() for m in group_messages(g, "build_warnings")]
    return root, plan
