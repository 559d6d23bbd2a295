"""How SparsifyCallback reaches into the LightningModule's own hooks: Lightning has no callback hook
between ``configure_model`` and the checkpoint restore (both after ``setup``), and a callback
cannot change the loss ``training_step`` returns."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

import sparsify

__all__ = ["run_after", "add_penalty", "step_loss"]


def run_after(pl_module: nn.Module, hook: str, after: Callable) -> None:
    """Make ``pl_module.<hook>`` call ``after`` with its arguments after the module's own hook ran
    (once per module and hook: a second callback or a second ``fit`` does not wrap it again).

    >>> m = nn.Module(); m.configure_model = lambda: print("built")
    >>> run_after(m, "configure_model", lambda: print("then this")); m.configure_model()
    built
    then this
    """
    flag = f"_sparsify_{hook}_wrapped"
    if getattr(pl_module, flag, False):
        return
    original = getattr(pl_module, hook)

    @functools.wraps(original)  # (Lightning calls configure_model only when is_overridden sees it defined)
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        after(*args, **kwargs)
        return out
    setattr(pl_module, hook, wrapped)
    setattr(pl_module, flag, True)


def add_penalty(pl_module: nn.Module, modules: Callable[[], list]) -> None:
    """Make ``pl_module.training_step`` return its loss plus the penalty of ``modules()`` (under
    automatic optimization; under manual optimization the step ran its own backward), and keep
    the loss it returned, before the penalty, in ``pl_module._sparsify_losses`` (:func:`step_loss`)."""
    if getattr(pl_module, "_sparsify_penalty_wrapped", False):
        return
    original = pl_module.training_step
    pl_module._sparsify_losses = []

    def training_step(*args, **kwargs):
        out = original(*args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, torch.Tensor):  # undivided: Lightning divides by the accumulation after this
            pl_module._sparsify_losses.append(loss.detach())
        if not pl_module.automatic_optimization:
            # the step already ran its backward: the penalty is the user's to add before
            # it, and sparsify.step warns when the recorded terms were never collected
            return out
        penalty = sum((sparsify.penalty(m) for m in modules()), 0.0)
        if out is None or (isinstance(penalty, float) and penalty == 0.0):
            return out  # None: Lightning skips this batch, and its terms are forgotten
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] + penalty}
        return out + penalty
    pl_module.training_step = training_step
    pl_module._sparsify_penalty_wrapped = True


def step_loss(pl_module: nn.Module) -> torch.Tensor | None:
    """The training loss of the optimizer step that just ran: the mean of the losses its
    micro-batches' ``training_step`` returned (as the Hugging Face callback's ``step_loss``); the
    list is emptied for the next step.

    >>> m = nn.Module(); m._sparsify_losses = [torch.tensor(1.0), torch.tensor(3.0)]
    >>> float(step_loss(m)), step_loss(m)
    (2.0, None)
    """
    losses, pl_module._sparsify_losses = getattr(pl_module, "_sparsify_losses", []), []
    return torch.stack([v.float().reshape(()) for v in losses]).mean() if losses else None
