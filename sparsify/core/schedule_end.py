"""Whether the schedules reach their end: what ``finalize`` warns when the model stopped short of
them (:func:`schedule_unfinished`), and what a trainer that knows its run length warns before it
starts (:func:`schedule_short`).

Apart from :mod:`sparsify.core.pace`, which counts optimizer steps as they happen through a global
hook: these read the state's step and schedules once, at either end of the run. :data:`ADVICE`,
the fix both modules' warnings end with, lives here so that pace imports it from below.
"""
from __future__ import annotations

from torch import nn

from sparsify.core.state import find_state
from sparsify.core.wrappers import unwrap

__all__ = ["ADVICE", "schedule_unfinished", "schedule_short"]

ADVICE = ("call sparsify.step(model) after every optimizer step (not once per epoch; with transformers' Trainer "
          "pass callbacks=[SparsifyTrainerCallback()], with Lightning SparsifyCallback), and give sparsify() "
          "total_steps= the number of optimizer steps the run takes")


def schedule_unfinished(model: nn.Module) -> str | None:
    """What ``finalize`` warns when the model is not where its schedules end: ``sparsify.step``
    never called although the model trained (it has gradients), a target sparsity not reached
    yet, or a ``fix`` step not reached (ST-3 / N:M; training stopped early, or ``step`` was called
    less often than the optimizer's, e.g. once per epoch); None when none.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "gmp", total_steps=100)
    >>> schedule_unfinished(m).split(",")[0]
    'sparsify.finalize: at step 0 the gmp schedule (rule0_magnitude) is at sparsity 0 of its final 0.9'
    """
    state = find_state(model)
    t = int(state.step)
    behind = _behind(state, t)
    if behind:
        recipe, name, now, final = behind
        now_s, final_s = _apart(now, final)
        return (f"sparsify.finalize: at step {t} the {recipe} schedule ({name}) is at sparsity {now_s} of its final "
                f"{final_s}, so the deployed model is less sparse than the recipe's target: training stopped before "
                "the schedule's end, or sparsify.step was not called after every optimizer step: " + ADVICE)
    if t == 0 and any(p.grad is not None for p in unwrap(model).parameters()):
        return ("sparsify.finalize: the model has gradients but sparsify.step was never called, so no method "
                "moved past step 0; " + ADVICE)
    if late := _before_fix(state, t):
        recipe, name, fix = late
        return (f"sparsify.finalize: at step {t} the {recipe} schedule ({name}) is before its "
                f"fix at step {fix}: the training under frozen masks that follows the fix never ran: training stopped "
                "before the schedule's end, or sparsify.step was not called after every optimizer step: " + ADVICE)
    return None


def _apart(now: float, final: float) -> tuple[str, str]:
    """``now`` and ``final`` to 3 significant digits, or to as many more as it takes to tell them
    apart (a schedule one step short of its end reads 0.89999, not 0.9 of its final 0.9).

    >>> _apart(0.268, 0.9), _apart(0.8999901, 0.9)
    (('0.268', '0.9'), ('0.89999', '0.9'))
    """
    for digits in range(3, 18):
        now_s, final_s = f"{now:.{digits}g}", f"{final:.{digits}g}"
        if now_s != final_s:
            break
    return now_s, final_s


def _behind(state, t: int):
    """(recipe name, group name, target at step ``t``, final target) of the first group whose
    schedule has not reached its final target at step ``t``; None when every one has."""
    for name, g in state.groups.items():
        final, now = g.final_target(), g.target(t)
        if final is not None and now is not None and now < final - 1e-9:
            return state.recipe.get("name") or g.method_name, name, now, final
    return None


def _before_fix(state, t: int):
    """(recipe name, group name, fix step) of the first group whose schedule has a ``fix`` (ST-3,
    N:M, magnitude: ``fix_at``) not reached at step ``t``; None when none has. A fix after
    ``total_steps`` is left out: ``sparsify()`` warned that it never comes. (Not ``describe``:
    N:M's reads every weight, which on a sharded model finalize has yet to refuse is a collective.)"""
    for name, g in state.groups.items():
        fix = getattr(g, "fix_at", None)
        if fix is not None and t < fix and (state.total_steps is None or fix <= state.total_steps):
            return state.recipe.get("name") or g.method_name, name, int(fix)
    return None


def schedule_short(model: nn.Module, steps: int) -> str | None:
    """What a trainer that knows its run length (``steps`` optimizer steps in all) warns before
    training when the run ends before the recipe's schedules do; None when it does not.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "gmp", total_steps=100)
    >>> schedule_short(m, 100) is None
    True
    >>> print(schedule_short(m, 10))  # doctest: +NORMALIZE_WHITESPACE
    sparsify: the run takes 10 optimizer steps, and at its end the gmp schedule (rule0_magnitude) is at
    sparsity 0.268 of its final 0.9: give sparsify() total_steps=10 (it has total_steps=100)
    """
    state = find_state(model)
    behind = _behind(state, int(steps))
    if behind is None:
        return None
    recipe, name, now, final = behind
    now_s, final_s = _apart(now, final)
    return (f"sparsify: the run takes {steps} optimizer steps, and at its end the {recipe} schedule ({name}) is at "
            f"sparsity {now_s} of its final {final_s}: give sparsify() total_steps={steps} (it has "
            f"total_steps={state.total_steps})")
