"""A PyTorch Lightning callback: adds ``sparsify.penalty`` to the training loss and calls
``sparsify.step`` after every optimizer step.

>>> from sparsify.integrations.lightning import SparsifyCallback      # doctest: +SKIP
>>> trainer = lightning.Trainer(max_steps=1000, callbacks=[SparsifyCallback("st3", attr="net")])  # doctest: +SKIP

With ``recipe`` and ``attr`` the callback sparsifies ``pl_module.<attr>`` itself at ``setup``
(before ``configure_optimizers`` runs), with ``total_steps = trainer.estimated_stepping_batches``.
Without them it drives every submodule the user already sparsified, and warns when the run ends
before its schedules do. Under manual optimization (``automatic_optimization = False``) the
training step runs its own backward: add ``sparsify.penalty(self.net)`` to the loss there.

With Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging``, your own subclasses), in
either order in ``callbacks=[...]``, the averaged copy is made from the sparsified module and keeps the
training model's sparsity (``sparsify.sync``, docs/averaging.md): without
that, the averaged masks (the union of all masks so far) are what validation runs with and what
``fit`` leaves in the model at its end.
"""
from __future__ import annotations

import difflib
import math
import warnings

import lightning.pytorch as pl
import torch
from torch import nn

import sparsify
from sparsify.core.layers import drop_all_caches
from sparsify.core.pace import schedule_short
from sparsify.core.state import find_state
from sparsify.prepare.capture import check_capture
from sparsify.prepare.recipe import CALL_KEYWORDS, load_recipe
from sparsify.prepare.validate import check_total_steps

__all__ = ["SparsifyCallback", "sparsified_modules", "averaging_callbacks"]


def sparsified_modules(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` (itself included) made by ``sparsify.sparsify``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"sparsified_modules: module must be an nn.Module (the LightningModule, or a network in it), "
                        f"got {type(module).__name__}")
    found, skip = [], set()
    for name, m in module.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if find_state(m, required=False) is not None:
            found.append(m)
            skip.add(name)
    return found


def averaging_callbacks(trainer, kinds: tuple[str, ...] = ("WeightAveraging",)) -> list:
    """The trainer's callbacks of Lightning's classes named ``kinds`` (and their subclasses):
    by default the weight-averaging ones (``WeightAveraging``, ``EMAWeightAveraging``).

    >>> ema = pl.callbacks.EMAWeightAveraging()
    >>> averaging_callbacks(pl.Trainer(callbacks=[SparsifyCallback(), ema], logger=False)) == [ema]
    True
    """
    classes = tuple(c for c in (getattr(pl.callbacks, k, None) for k in kinds) if c is not None)
    return [c for c in trainer.callbacks if classes and isinstance(c, classes)]


# callbacks that copy the LightningModule in their setup: listed before this one, they copied it
# before it was sparsified (StochasticWeightAveraging averages parameters only and copies them
# back at the end: its copy needs the same parameters, not the training model's sparsity)
_COPYING = ("WeightAveraging", "StochasticWeightAveraging")


def _averaged(callback) -> nn.Module | None:
    # Lightning keeps the AveragedModel private; it exists from the callback's setup("fit") on
    return getattr(callback, "_average_model", None)


_MISSING = object()


class SparsifyCallback(pl.Callback):
    """Penalty in the loss, ``sparsify.step`` after each optimizer step (gradient accumulation
    respected: it follows ``trainer.global_step``)."""

    def __init__(self, recipe=None, attr: str | None = None, **sparsify_kwargs):
        super().__init__()
        if (recipe is None) != (attr is None):
            raise ValueError("give both recipe and attr (the LightningModule attribute to sparsify), or neither")
        if recipe is None and sparsify_kwargs:  # they would be ignored: nothing is sparsified here
            raise TypeError(f"SparsifyCallback: {', '.join(sorted(sparsify_kwargs))} given without recipe and attr: "
                            "sparsify()'s arguments are for the module the callback sparsifies itself")
        if recipe is not None:  # checked here: a wrong argument would otherwise surface only inside fit
            if not (isinstance(attr, str) and attr.isidentifier()):
                raise TypeError(f"SparsifyCallback: attr must be the name of the LightningModule attribute to "
                                f"sparsify (a str such as 'net'), got {attr!r}")
            load_recipe(recipe, **{k: v for k, v in sparsify_kwargs.items() if k not in CALL_KEYWORDS})
            check_total_steps(sparsify_kwargs.get("total_steps"))
            if sparsify_kwargs.get("capture") is not None:
                check_capture(sparsify_kwargs["capture"])
        self.recipe, self.attr, self.kwargs = recipe, attr, sparsify_kwargs
        self._last_step = None

    def setup(self, trainer, pl_module, stage=None):
        if self.recipe is not None and stage in (None, "fit") and \
                find_state(self._target(pl_module), required=False) is None:
            launcher = getattr(trainer.strategy, "launcher", None)
            if hasattr(launcher, "_recover_results_in_main_process"):
                # spawned or forked processes: the module of the process that called fit stays
                # dense, and Lightning loads the trained weights into it (not strictly) at the end
                raise RuntimeError(
                    f"SparsifyCallback({self.recipe!r}, attr={self.attr!r}) would sparsify inside the processes "
                    f"strategy {type(trainer.strategy).__name__} ({getattr(launcher, '_start_method', '?')}) starts: "
                    "the module of the process that calls fit stays dense and gets the trained weights without "
                    f"their masks. Sparsify it before fit (pl_module.{self.attr} = sparsify.sparsify(..., "
                    "total_steps=...), then SparsifyCallback()), or use strategy='ddp'")
            kwargs = dict(self.kwargs)
            kwargs.setdefault("total_steps", int(trainer.estimated_stepping_batches))
            setattr(pl_module, self.attr, sparsify.sparsify(getattr(pl_module, self.attr), self.recipe, **kwargs))
            for callback in averaging_callbacks(trainer, _COPYING):
                if _averaged(callback) is not None:  # it copied the module before it was sparsified
                    callback.setup(trainer, pl_module, stage or "fit")
        if not sparsified_modules(pl_module):
            raise RuntimeError("SparsifyCallback: no sparsified module in the LightningModule; pass "
                               "SparsifyCallback(recipe, attr='net') or sparsify the network yourself")
        steps = trainer.estimated_stepping_batches
        if stage in (None, "fit") and math.isfinite(steps):
            for m in sparsified_modules(pl_module):
                if short := schedule_short(m, int(steps)):
                    warnings.warn(short + " (SparsifyCallback: the Trainer's estimated_stepping_batches)", stacklevel=2)
        if not getattr(pl_module, "_sparsify_penalty_wrapped", False):
            original = pl_module.training_step

            def training_step(*args, **kwargs):
                out = original(*args, **kwargs)
                if not pl_module.automatic_optimization:
                    # the step already ran its backward: the penalty is the user's to add before
                    # it, and sparsify.step warns when the recorded terms were never collected
                    return out
                penalty = sum((sparsify.penalty(m) for m in sparsified_modules(pl_module)), 0.0)
                if out is None or (isinstance(penalty, float) and penalty == 0.0):
                    return out  # None: Lightning skips this batch, and its terms are forgotten
                if isinstance(out, dict):
                    return {**out, "loss": out["loss"] + penalty}
                return out + penalty
            pl_module.training_step = training_step
            pl_module._sparsify_penalty_wrapped = True

    def _target(self, pl_module) -> nn.Module:
        """``pl_module.<attr>``, or an error naming the attribute and what the module holds."""
        where = f"SparsifyCallback(attr={self.attr!r})"
        target = getattr(pl_module, self.attr, _MISSING)
        if target is _MISSING:
            close = difflib.get_close_matches(self.attr, [n for n, _ in pl_module.named_children()], n=1)
            raise AttributeError(f"{where}: {type(pl_module).__name__} has no attribute {self.attr!r}"
                                 + (f"; did you mean {close[0]!r}?" if close else ""))
        if not isinstance(target, nn.Module):
            raise TypeError(f"{where}: {type(pl_module).__name__}.{self.attr} is {type(target).__name__}, not the "
                            "nn.Module to sparsify")
        return target

    def _sync_averages(self, trainer, pl_module) -> None:
        """Give every averaged copy the training model's sparsity (after an update of it, and before
        it is swapped into the model, copied into it or saved)."""
        for callback in averaging_callbacks(trainer):
            averaged = _averaged(callback)
            if averaged is None:
                continue
            for copy, module in zip(sparsified_modules(averaged.module), sparsified_modules(pl_module)):
                sparsify.sync(copy, module)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._sync_averages(trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and averaging_callbacks(trainer):
            drop_all_caches(pl_module)  # the averaged weights came in through .data (no version bump)

    def on_validation_end(self, trainer, pl_module):
        if averaging_callbacks(trainer):
            drop_all_caches(pl_module)  # after every on_validation_epoch_end: the training weights are back

    def on_train_end(self, trainer, pl_module):
        self._sync_averages(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if averaging_callbacks(trainer):
            drop_all_caches(pl_module)  # the averaged weights were copied in at on_train_end

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._sync_averages(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._last_step is None:
            self._last_step = 0
        if trainer.global_step > self._last_step:  # an optimizer step happened in this batch
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # {} when the step returned None
            # Lightning's StochasticWeightAveraging ends with an epoch that only refreshes the
            # BatchNorm statistics: no backward, so its one optimizer step is no training step
            trained = not getattr(trainer.fit_loop, "_skip_backward", False)
            for m in sparsified_modules(pl_module) if trained else ():
                for _ in range(trainer.global_step - self._last_step):
                    sparsify.step(m, loss if isinstance(loss, torch.Tensor) else None)
            self._last_step = trainer.global_step
            self._sync_averages(trainer, pl_module)  # the averaging callbacks listed before this one updated
        else:  # accumulating: forget penalties recorded by this micro-batch's forward
            pass

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")
