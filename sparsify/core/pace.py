"""Whether ``sparsify.step`` keeps pace with training. The one silent way to break the
training-loop contract is to call ``sparsify.step`` less often than ``optimizer.step`` (once per
epoch, or not at all): the schedules then stand still or crawl, ``total_steps`` means something
else than the run, and nothing fails. Two checks say so:

* during training, a global optimizer post-step hook counts, for every sparsified model still
  alive, the ``torch.optim`` steps that updated one of its sparse layers' weights;
  ``sparsify.step`` resets the count, and :data:`LAG` steps in a row without it warn once;
* at ``finalize``, :func:`~sparsify.core.schedule_end.schedule_unfinished` says when a schedule
  has not reached its final target, or when the model has gradients but never took a
  ``sparsify.step``.

Two optimizers stepping one model (weights and thresholds apart) count twice per iteration and
stay far below :data:`LAG`; an optimizer that updates none of the sparse layers (a frozen
backbone) is not counted.

The other way round, ``sparsify.step`` called more often than the optimizer steps (once per
micro-batch under gradient accumulation, or a float16 ``GradScaler`` skipping every step on
non-finite gradients) runs the schedules ahead of training: :func:`check_idle` warns when half of
:data:`LAG` calls in a row followed no optimizer step (once an optimizer has stepped the model).

Called less often at a steady rate (on every other optimizer step) keeps the lag under
:data:`LAG`: :func:`check_rate` warns when, over a window of :data:`LAG` calls, one optimizer
stepped the model at least 1.5 times as often. It counts each optimizer apart, so two optimizers
stepping one model once per iteration each (weights and thresholds apart) stay at 1; gradient
accumulation and a ``GradScaler`` skipping steps only lower the count.

The same hook sees which parameters the optimizers hold. An optimizer built *before* ``sparsify``
holds the model's parameters from then: not the ones the recipe added or replaced (STR's
thresholds, SAS's wider weights), which then never train, and nothing fails. At the first
``sparsify.step`` after an optimizer step, :func:`check_held` warns when no optimizer stepped
one of them (or, with ``copy=True``, any parameter of the model).

The same hook sees the order: an optimizer step that comes right after ``sparsify.step``, with no
forward with gradients through the sparse layers between, means the loop calls ``sparsify.step``
before ``optimizer.step()`` (:func:`_check_order`, once).

And when an optimizer stepped the sparse layers' weights but no forward with gradients ran through
any sparse layer since the last ``sparsify.step`` (:mod:`sparsify.core.forwards`), the loop trains
the model given to ``sparsify``, which shares those weights: :func:`check_bypassed` warns once.
"""
from __future__ import annotations

import warnings
import weakref

from torch import nn

from passes.calls import skipped_edit_calls

from sparsify.core.forwards import forwarded, forwarded_yet
from sparsify.core.records import RecordsGroupMixin
# the finalize-time checks moved to schedule_end; their names stay importable from here
from sparsify.core.schedule_end import ADVICE, schedule_short, schedule_unfinished  # noqa: F401

__all__ = ["LAG", "ADVICE", "watch", "reset", "optimizer_steps", "check_held", "check_idle", "check_rate",
           "check_bypassed",
           "schedule_unfinished", "schedule_short"]

#: optimizer steps in a row without ``sparsify.step`` that warn (a once-per-epoch call is caught
#: within its first epoch of this many batches)
LAG = 20

# watched states (the models still alive) -> optimizer steps since their last sparsify.step
_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SKIPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # skipped_edit_calls() at the last check
# watched states -> their model (weakly): a recipe with no sparse layers (activation penalties
# only) is counted by the steps that update any of the model's parameters
_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# watched states -> (the trainable parameters sparsify created, by name; the ids of the parameters
# optimizers stepped since), until check_held has looked once
_HELD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# watched states an optimizer has stepped -> [sparsify.step calls in the current window of LAG,
# those that followed no optimizer step]
_IDLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# watched states an optimizer has stepped -> [sparsify.step calls in the current window of LAG,
# {id(optimizer): its steps on the model in the window}]
_RATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# watched states whose last event was a sparsify.step (no optimizer step since), for check of order
_AFTER_STEP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HOOK = None


def _weights(state) -> set[int]:
    ids = {id(m.weight) for m in state.members() if getattr(m, "weight", None) is not None}
    if not ids and (model := _MODELS.get(state, lambda: None)()) is not None:
        ids = {id(p) for p in model.parameters()}
    return ids


def _drop_records(state) -> int:
    """Forget the penalty terms recorded before an optimizer step that no sparsify.step
    followed: they can no longer reach a loss, and each holds its forward's autograd graph
    (activations included) alive. Returns how many there were."""
    left = 0
    for g in state.groups.values():
        if isinstance(g, RecordsGroupMixin):
            before = g.uncollected
            g.clear()
            left += g.uncollected - before
    return left


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if not _COUNTS:
        return
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for seen in list(_HELD.values()):
        seen[1].update(stepped)
    for state in list(_COUNTS):
        if stepped.isdisjoint(_weights(state)):
            continue
        if _AFTER_STEP.pop(state, False):
            _check_order(state, optimizer)
        n = _COUNTS[state] = _COUNTS[state] + 1
        steps = _RATE.setdefault(state, [0, {}])[1]
        steps[id(optimizer)] = steps.get(id(optimizer), 0) + 1
        dropped = _drop_records(state) if n >= 2 else 0  # a whole iteration without sparsify.step
        if n == LAG and "lag" not in state.warned:
            state.warned.add("lag")
            what = ("the schedules, thresholds and masks stand still in between" if not dropped else
                    "the recipe's penalty recorded meanwhile was never added to a loss")
            warnings.warn(f"sparsify: {type(optimizer).__name__} stepped {n} times since the last sparsify.step, "
                          f"and {what}: {ADVICE}", stacklevel=3)


def _check_order(state, optimizer) -> None:
    """An optimizer step right after ``sparsify.step`` with no forward with gradients through the
    sparse layers between: the loop calls ``sparsify.step`` before ``optimizer.step()``. Nothing
    fails; every step's masks and thresholds come from weights one update old, and the last update
    is never masked. Warned once (a closure optimizer such as LBFGS runs its forward inside
    ``step``, before this hook: not taken for it)."""
    layers = state.members()
    if not layers or forwarded_yet(layers) or "order" in state.warned:
        return
    state.warned.add("order")
    warnings.warn(f"sparsify: {type(optimizer).__name__}.step() ran after sparsify.step() with no training forward "
                  "between, so sparsify.step comes before optimizer.step() in this loop: its masks and thresholds "
                  "are then computed from the weights before each update (one step old). Call it after: forward, "
                  "backward, optimizer.step(), sparsify.step(model)", stacklevel=4)


def watch(state, model: nn.Module | None = None, created: list[str] = ()) -> None:
    """Count the optimizer steps that update ``state``'s model's sparse layers (all of
    ``model``'s parameters when the recipe has no sparse layers); ``created``: the trainable
    parameters ``sparsify`` added or replaced, by name (see :func:`check_held`).

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=10)
    >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> m(torch.ones(1, 4)).sum().backward(); opt.step(); opt.step()
    >>> optimizer_steps(m.sparsify_state)
    2
    >>> _ = sparsify.step(m); optimizer_steps(m.sparsify_state)
    0
    """
    global _HOOK
    _COUNTS.setdefault(state, 0)
    _SKIPS.setdefault(state, skipped_edit_calls())
    forwarded(state.members())  # the flags exist before any replica
    if model is not None:
        _MODELS[state] = weakref.ref(model)
        if created:
            _HELD[state] = (list(created), set())
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def reset(state) -> None:
    """``sparsify.step`` ran: no optimizer step is behind it."""
    if state in _COUNTS:
        _COUNTS[state] = 0
        _AFTER_STEP[state] = True


def check_held(state) -> str | None:
    """Once, at the first ``sparsify.step`` after an optimizer step: what to warn when the
    optimizers miss parameters ``sparsify`` created (built before it, or from a filter that left
    them out); None when they hold them all (or nothing is known yet).

    >>> import torch, sparsify
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)     # before sparsify: misses STR's thresholds
    >>> m = sparsify.sparsify(net, "str", total_steps=10)
    >>> m(torch.ones(1, 4)).sum().backward(); opt.step()
    >>> print(check_held(m.sparsify_state)[:105])
    sparsify: no optimizer updates 1 parameter that sparsify() added or replaced ('0.s'), so they never train
    """
    entry = _HELD.get(state)
    model = _MODELS.get(state, lambda: None)()
    if entry is None or model is None or not entry[1]:
        return None
    del _HELD[state]
    created, seen = entry
    current = dict(model.named_parameters())
    missing = [n for n in created if n in current and current[n].requires_grad and id(current[n]) not in seen]
    if not missing:
        return None
    fix = ("build it after sparsify(), from the sparsified model: "
           "torch.optim.SGD(sparsify.param_groups(model, weight_decay), lr=...)")
    if seen.isdisjoint(id(p) for p in current.values()):
        return (f"sparsify: no optimizer updates any parameter of this model (sparsify(copy=True) gave it its own "
                f"tensors): the optimizer was built before sparsify(); {fix}")
    names = ", ".join(repr(n) for n in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"sparsify: no optimizer updates {len(missing)} parameter{'s' if len(missing) > 1 else ''} that "
            f"sparsify() added or replaced ({names}), so they never train (STR's thresholds, SAS's wider weights): "
            "the optimizer may have been built before sparsify(), or from a filter of the parameters that left "
            f"them out (STR's thresholds are named '<layer>.s'); {fix}")


def check_idle(state) -> str | None:
    """Called by ``sparsify.step`` before :func:`reset`: what to warn when, in the current window
    of :data:`LAG` calls, half or more followed no optimizer step on the model (calls right after
    one that followed ``k`` steps count as following one each, up to ``k - 1`` of them); None otherwise
    (or before any optimizer has stepped it: a frozen backbone's sparse layers are never
    stepped, and optimizers outside ``torch.optim`` are not seen).

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=100)
    >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> said = []
    >>> for i in range(40):                     # 4 micro-batches per optimizer step
    ...     m(torch.ones(1, 4)).sum().backward()
    ...     if i % 4 == 3: opt.step()
    ...     said.append(check_idle(m.sparsify_state)); _ = reset(m.sparsify_state)
    >>> [i for i, s in enumerate(said) if s], said[22][:74]
    ([22], 'sparsify: 15 of the last 20 sparsify.step calls followed no optimizer step')
    """
    n = _COUNTS.get(state)
    if n is None or (n == 0 and state not in _IDLE):
        return None
    window = _IDLE.setdefault(state, [0, 0, 0])
    window[0] += 1
    if n == 0 and window[2]:
        # catching up, call after call, with the optimizer steps an earlier call came after (a
        # trainer callback that steps a module once per optimizer step at the batch's end)
        window[2] -= 1
    else:
        window[1] += n == 0
        window[2] = max(n - 1, 0)
    if window[0] < LAG:
        return None
    idle = window[1]
    window[:2] = [0, 0]
    if 2 * idle < LAG:
        return None
    return (f"sparsify: {idle} of the last {LAG} sparsify.step calls followed no optimizer step on this model, so "
            "its schedules run ahead of training: call sparsify.step once per optimizer step (with gradient "
            "accumulation, only after the optimizer.step that ends each accumulation). Under float16 autocast, a "
            "GradScaler that skips steps on non-finite gradients does this too (check scaler.get_scale(); "
            "bfloat16 has float32's range)")


def check_rate(state) -> str | None:
    """Called by ``sparsify.step``: what to warn when, over the current window of :data:`LAG`
    calls, one optimizer stepped the model 1.5 times as often or more (``sparsify.step`` on every
    other optimizer step: the schedules run at half speed, a ``fix`` comes late or never); None
    otherwise. Each optimizer is counted apart (two stepping one model each step once per call).

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=100)
    >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> said = []
    >>> for i in range(80):
    ...     m(torch.ones(1, 4)).sum().backward(); opt.step()
    ...     if i % 2: said.append(check_rate(m.sparsify_state)); _ = reset(m.sparsify_state)
    >>> [i for i, s in enumerate(said) if s], said[19][:79]
    ([19, 39], 'sparsify: an optimizer stepped this model 40 times in the last 20 sparsify.step')
    """
    window = _RATE.get(state)
    if window is None:
        return None
    window[0] += 1
    if window[0] < LAG:
        return None
    most = max(window[1].values(), default=0)
    window[:] = [0, {}]
    if 2 * most < 3 * LAG:
        return None
    return (f"sparsify: an optimizer stepped this model {most} times in the last {LAG} sparsify.step calls, so its "
            f"schedules run {most / LAG:.2g} times slower than training (a ramp stretches past the run, a fix comes "
            "late or never): " + ADVICE)


def check_bypassed(state, root: nn.Module | None = None) -> str | None:
    """Called by ``sparsify.step`` before :func:`reset`: what to warn when an optimizer stepped the
    sparse layers' weights since the last step but no forward with gradients ran through any of
    them (:mod:`sparsify.core.forwards`): the loop trains the model ``sparsify`` was given, whose
    parameters the sparse model shares, or it trains the sparse model ``root`` through methods
    other than ``forward`` (timm's ``forward_features`` / ``forward_head`` call the submodules
    directly and skip the nodes a recipe inserted); no loss sees the masks; None otherwise. A
    ``root`` with a ``forward_features`` method gets the second cause first. Clears the forward
    flags either way.

    >>> import torch, sparsify
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> m = sparsify.sparsify(net, "gmp", total_steps=10)
    >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> net(torch.ones(1, 4)).sum().backward(); opt.step()      # the given model, not m
    >>> print(check_bypassed(m.sparsify_state)[:97])
    sparsify.step: an optimizer stepped the sparse model's weights, but no forward with gradients ran
    >>> m(torch.ones(1, 4)).sum().backward(); opt.step()
    >>> check_bypassed(m.sparsify_state) is None
    True
    """
    layers = state.members()
    skipped, _SKIPS[state] = skipped_edit_calls() - _SKIPS.get(state, 0), skipped_edit_calls()
    if forwarded(layers) or not layers or not _COUNTS.get(state):  # no layers: the recipe rewrote nothing
        return None
    if skipped:  # the model was trained, through its own forward: the call it got was not the traced one
        return ("sparsify.step: an optimizer stepped the sparse model's weights, but no forward with gradients ran "
                "through its sparse layers since the last step: a traced module was called with arguments its "
                "graph was not traced for and ran its own forward without them (see the warning that names it): "
                "pass example_inputs to sparsify() that call it as the training loop does")
    other = ("the loop trains another model holding the same parameters (the one given to sparsify(), which "
             "returns a new model: model = sparsify.sparsify(model, ...), then train that one)")
    methods = ("the loop calls methods other than forward (timm's forward_features / forward_head), which call the "
               "submodules directly and skip the nodes the recipe inserted: call model(x) (docs/integrations.md)")
    head = ("sparsify.step: an optimizer stepped the sparse model's weights, but no forward with gradients ran "
            "through its sparse layers since the last step, so no loss sees the masks and thresholds: ")
    if callable(getattr(root, "forward_features", None)):
        return head + f"this model has forward_features: {methods}; or {other}"
    return head + f"{other}; or {methods}"


def optimizer_steps(state) -> int:
    """The optimizer steps on ``state``'s model since its last ``sparsify.step``."""
    return _COUNTS.get(state, 0)
