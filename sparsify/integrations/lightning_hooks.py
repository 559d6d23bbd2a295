"""How SparsifyCallback reaches into the LightningModule's own hooks: Lightning has no callback hook
between ``configure_model`` and the checkpoint restore (both after ``setup``), and a callback
cannot change the loss ``training_step`` returns."""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn

import sparsify

__all__ = ["run_after", "add_penalty"]


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
    automatic optimization; under manual optimization the step ran its own backward)."""
    if getattr(pl_module, "_sparsify_penalty_wrapped", False):
        return
    original = pl_module.training_step

    def training_step(*args, **kwargs):
        out = original(*args, **kwargs)
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
