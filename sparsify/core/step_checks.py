"""What ``sparsify.step`` says once a step has advanced the schedules: each check returns
``(key, message)`` pairs, and :func:`say_once` warns each key once per model.

The pace checks that run before the step (:mod:`sparsify.core.pace`) feed the same list.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from sparsify.core.dead_outputs import dead_outputs, dead_outputs_message
from sparsify.core.diverged import check_due, diverged_message, nonfinite_parameters
from sparsify.core.penalty_watch import CONSTANT_PENALTY, unreached_penalty
from sparsify.core.state import SparsifyState
from sparsify.core.weight_growth import grown, growth_due, growth_message, largest_weights

__all__ = ["after_step", "as_loss", "say_once", "group_messages"]


def as_loss(loss) -> float | None:
    """``sparsify.step``'s ``loss`` as a float (None stays None): a number or a one-element tensor.

    >>> as_loss(torch.tensor([2.5])), as_loss(None)
    (2.5, None)
    >>> as_loss("1.0")
    Traceback (most recent call last):
    ...
    TypeError: sparsify.step: loss must be a number or a one-element tensor, got str
    """
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"sparsify.step: loss is the step's training loss, one number; got a tensor of shape "
                             f"{tuple(loss.shape)} (per-sample losses? pass loss.mean())")
        if loss.dtype == torch.bool or loss.is_complex():
            raise TypeError(f"sparsify.step: loss must be a number or a one-element tensor, got a {loss.dtype} tensor")
        return float(loss.detach())
    # bool is a number to Python, but True as a loss is a mistake (a flag passed for the loss)
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"sparsify.step: loss must be a number or a one-element tensor, got {type(loss).__name__}")
    return float(loss)


def group_messages(group, hook: str) -> list[str]:
    """What ``group.<hook>()`` (``warnings`` or ``build_warnings``) returns, checked: a list of
    strings (a method of the user's returning one string was said one character at a time).

    >>> from types import SimpleNamespace
    >>> group_messages(SimpleNamespace(warnings=lambda: ["a"]), "warnings")
    ['a']
    >>> group_messages(SimpleNamespace(warnings=lambda: "abc", method_name="mine"), "warnings")
    Traceback (most recent call last):
    TypeError: method 'mine': its group's warnings() returned a str; it returns a list of messages (one string each)
    """
    said = getattr(group, hook)()
    if said is None:
        return []
    if isinstance(said, (str, bytes)) or not all(isinstance(m, str) for m in said):
        raise TypeError(f"method {getattr(group, 'method_name', type(group).__name__)!r}: its group's {hook}() "
                        f"returned {'a ' + type(said).__name__ if isinstance(said, (str, bytes)) else 'other items'}"
                        "; it returns a list of messages (one string each)")
    return list(said)


def after_step(state: SparsifyState, root: nn.Module, t: int, loss: float | None) -> list[tuple[str, str]]:
    """The problems step ``t`` of ``state`` (unwrapped model ``root``) shows: a non-finite loss, a
    penalty no gradient reached, NaN/inf parameters (at :func:`check_due` steps), runaway weights,
    last-layer outputs pruned whole (at the run's last step and where a group fixes its masks),
    layers left dense as frozen unfrozen since, a step past ``total_steps``, and what each group says.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", total_steps=1, begin=0, end=0)
    >>> [key for key, _ in after_step(m.sparsify_state, m, 2, float("nan"))]
    ['nonfinite-loss', 'past-total']
    """
    said = []
    if loss is not None and not math.isfinite(loss):
        said.append(("nonfinite-loss", f"sparsify.step: the loss is {loss} at step {t}: training diverged; "
                     "lower the learning rate or check the loss (stop at the first non-finite loss)"))
    if (lost := unreached_penalty(state)) is not None:
        said.append(("penalty-constant" if lost == CONSTANT_PENALTY else "penalty-unreached", lost))
    if check_due(t, state.total_steps) and "nonfinite-params" not in state.warned:
        if bad := nonfinite_parameters(root):
            said.append(("nonfinite-params", diverged_message("sparsify.step", bad, t)))
    if growth_due(t) and "weights-grew" not in state.warned:
        said += _growth(state, root, t)
    # at the run's last step, and where a group fixes its masks (then a dead row stays dead)
    fixing = any(getattr(group, "fix_at", None) == t for group in state.groups.values())
    if (t == state.total_steps or fixing) and (dead := dead_outputs(root, getattr(state, "output_layers", []))):
        said.append(("dead-outputs", dead_outputs_message("sparsify.step", dead)))
    if getattr(state, "frozen_dense", None) and "unfrozen" not in state.warned and (thawed := _thawed(root, state)):
        said.append(("unfrozen", f"sparsify.step: {len(thawed)} layer(s) left dense at sparsify() because they were "
                     f"frozen are trainable now (first: {thawed[0]}) and train dense: the recipe does not reach "
                     "them. Unfreeze before sparsify(), or give the recipe \"options\": {\"frozen\": \"include\"} "
                     "to sparsify frozen layers too"))
    if state.total_steps and t > state.total_steps:
        said.append(("past-total", f"sparsify.step: step {t} is past total_steps={state.total_steps} given to "
                     "sparsify(): schedules stay at their final values; pass the number of optimizer steps "
                     "the run really takes (epochs x batches per epoch, divided by the gradient accumulation "
                     "steps)"))
    for group in state.groups.values():
        said += [(msg, msg) for msg in group_messages(group, "warnings")]
    return said


def _growth(state: SparsifyState, root: nn.Module, t: int) -> list[tuple[str, str]]:
    """Sparse layers whose weights grew far past their size at the first check (not saved: after
    a resume the first check of the new process is the reference)."""
    now = largest_weights(root)
    first = getattr(state, "first_weights", None)
    if first is None:
        state.first_weights = (t, now)
        return []
    rows = grown(first[1], now)
    return [("weights-grew", growth_message(rows, t, first[0]))] if rows else []


def _thawed(root: nn.Module, state: SparsifyState) -> list[str]:
    """The layers ``state.frozen_dense`` names whose weight requires a gradient now."""
    out = []
    for name in state.frozen_dense:
        try:
            w = getattr(root.get_submodule(name), "weight", None)
        except AttributeError:  # replaced by the user since
            continue
        if isinstance(w, torch.Tensor) and w.requires_grad:
            out.append(name)
    return out


def say_once(state: SparsifyState, said: list[tuple[str, str]], stacklevel: int) -> None:
    """Warn each message whose key ``state`` has not warned yet (``stacklevel``: the caller's
    frame as :func:`warnings.warn` counts it, from this function)."""
    for key, msg in said:
        if key not in state.warned:  # each once per model
            state.warned.add(key)
            warnings.warn(msg, stacklevel=stacklevel + 1)
