"""A PyTorch Lightning callback: adds ``sparsify.penalty`` to the training loss and calls
``sparsify.step`` after every optimizer step.

>>> from sparsify.integrations.lightning import SparsifyCallback      # doctest: +SKIP
>>> trainer = lightning.Trainer(max_steps=1000, callbacks=[SparsifyCallback("st3", attr="net")])  # doctest: +SKIP

With ``recipe`` and ``attr`` the callback sparsifies ``pl_module.<attr>`` itself at ``setup``
(before ``configure_optimizers`` runs; right after ``configure_model`` when that builds it), with
``total_steps = trainer.estimated_stepping_batches``.
Without them it drives every submodule the user already sparsified, and warns when the run ends
before its schedules do. Under manual optimization (``automatic_optimization = False``) the
training step runs its own backward: add ``sparsify.penalty(self.net)`` to the loss there. Each
sparsified module takes one ``sparsify.step`` per optimizer step that updates its parameters (a
GAN's discriminator optimizer does not advance the generator's schedule); on resume it goes on
from the module's own step counter (restored with its weights). A checkpoint written when the
callback sparsified the module holds it sparse, and ``load_from_checkpoint`` builds it dense: call
:func:`sparsify_as_saved` in the module's ``on_load_checkpoint``, or sparsify in ``__init__`` and
pass ``SparsifyCallback()``. In ``validate`` / ``test`` / ``predict`` with ``ckpt_path=`` the
callback does that itself for ``attr``; a module nothing sparsified runs dense, with a one-line note.

With Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging``, your own subclasses), in
either order in ``callbacks=[...]``, the averaged copy is made from the sparsified module and keeps the
training model's sparsity (``sparsify.sync``, docs/averaging.md): without
that, the averaged masks (the union of all masks so far) are what validation runs with and what
``fit`` leaves in the model at its end.
"""
from __future__ import annotations

import functools
import math
import warnings

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

import sparsify
from sparsify.core.layers import drop_all_caches
from sparsify.core.pace import schedule_short
from sparsify.core.state import find_state
from sparsify.integrations.lightning_hooks import add_penalty, run_after, step_loss
from sparsify.integrations.lightning_load import refuse_other_run, sparsify_as_saved
from sparsify.integrations.lightning_steps import _check_manual_total, _updated
from sparsify.integrations.lightning_target import check_arguments, refuse_spawned, target_of
from sparsify.prepare.recipe import CALL_KEYWORDS

__all__ = ["SparsifyCallback", "sparsified_modules", "averaging_callbacks", "sparsify_as_saved"]


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


class SparsifyCallback(pl.Callback):
    """Penalty in the loss, ``sparsify.step`` after each optimizer step that updates the sparsified
    module (gradient accumulation respected: a step is the optimizer's, not a batch)."""

    def __init__(self, recipe=None, attr: str | None = None, **sparsify_kwargs):
        super().__init__()
        check_arguments(recipe, attr, sparsify_kwargs)
        self.recipe, self.attr, self.kwargs = recipe, attr, sparsify_kwargs
        self._pending: dict[int, int] = {}  # id(sparsified module) -> optimizer steps not yet followed
        self._stepped = False  # an optimizer stepped since the last batch end
        self._derived = None  # total_steps taken from the trainer under manual optimization, to check
        self._batch_start = 0
        self._awaiting = False  # setup left sparsifying (or checking) to after configure_model

    def setup(self, trainer, pl_module, stage=None):
        fit = stage in (None, "fit")
        # Lightning calls the module's on_load_checkpoint before it loads the weights, in every
        # stage, after setup: validate(Module(), ckpt_path=...) sparsifies pl_module.<attr> there
        run_after(pl_module, "on_load_checkpoint", functools.partial(self._restore, pl_module))
        add_penalty(pl_module, functools.partial(sparsified_modules, pl_module))
        self._awaiting = fit and is_overridden("configure_model", pl_module) and (
            getattr(pl_module, self.attr, None) is None if self.recipe is not None else not sparsified_modules(pl_module))
        if self._awaiting:
            # built in configure_model, which Lightning calls after setup and before it wraps the
            # module (FSDP) and calls configure_optimizers: sparsified (or checked) right after it
            run_after(pl_module, "configure_model", functools.partial(self._built, pl_module))
            return
        if self.recipe is not None and fit and find_state(self._target(pl_module), required=False) is None:
            self._sparsify_target(trainer, pl_module, stage)
        if fit:
            self._check_fit(trainer, pl_module)

    def _built(self, pl_module) -> None:
        trainer = pl_module._trainer
        if not (self._awaiting and self._mine(trainer)):
            return  # (Lightning calls configure_model again after a WeightAveraging callback's setup did)
        self._awaiting = False
        if self.recipe is not None and find_state(self._target(pl_module), required=False) is None:
            self._sparsify_target(trainer, pl_module, "fit")
        self._check_fit(trainer, pl_module)

    def _mine(self, trainer) -> bool:
        """Whether this callback drives ``trainer`` (the module's wrapped hooks outlive a run)."""
        return trainer is not None and any(c is self for c in trainer.callbacks)

    def _sparsify_target(self, trainer, pl_module, stage) -> None:
        refuse_spawned(trainer, self.recipe, self.attr)
        kwargs = dict(self.kwargs)
        if "total_steps" not in kwargs:
            if not math.isfinite(steps := trainer.estimated_stepping_batches):
                raise ValueError(f"SparsifyCallback: the Trainer sets no run length (max_epochs={trainer.max_epochs}, "
                                 f"max_steps={trainer.max_steps}), so total_steps cannot be taken from it: pass "
                                 f"SparsifyCallback({self.recipe!r}, attr={self.attr!r}, total_steps=N)")
            kwargs["total_steps"] = int(steps)
            # Lightning's estimate counts batches, or max_steps, which under manual optimization
            # counts every optimizer's steps: how many are this module's is seen at the first batch
            self._derived = None if pl_module.automatic_optimization else kwargs["total_steps"]
        setattr(pl_module, self.attr, sparsify.sparsify(self._target(pl_module), self.recipe, **kwargs))
        for callback in averaging_callbacks(trainer, _COPYING):
            if _averaged(callback) is not None:  # it copied the module before it was sparsified
                callback.setup(trainer, pl_module, stage or "fit")

    def _check_fit(self, trainer, pl_module) -> None:
        """Something to drive, and a run as long as its schedules."""
        # (only in fit: in validate / test / predict a checkpoint restored after setup may sparsify it)
        if not sparsified_modules(pl_module):
            raise RuntimeError("SparsifyCallback: no sparsified module in the LightningModule; pass "
                               "SparsifyCallback(recipe, attr='net') or sparsify the network yourself")
        steps = trainer.estimated_stepping_batches  # (test has none: it needs the train dataloader)
        if math.isfinite(steps):
            for m in sparsified_modules(pl_module):
                if short := schedule_short(m, int(steps)):
                    warnings.warn(short + " (SparsifyCallback: the Trainer's estimated_stepping_batches)", stacklevel=2)

    def _restore(self, pl_module, checkpoint: dict) -> None:
        """Sparsify ``pl_module.<attr>`` as ``checkpoint`` holds it, when no fit did; when one did,
        refuse a checkpoint of another run naming what to pass this callback."""
        if not self._mine(pl_module._trainer) or self.recipe is None:
            return
        state = find_state(self._target(pl_module), required=False)
        if state is None:
            sparsify_as_saved(pl_module, checkpoint,
                              **{k: v for k, v in self.kwargs.items() if k in CALL_KEYWORDS and k != "total_steps"})
            return
        refuse_other_run(checkpoint, state, self.recipe, self.attr, self.kwargs)

    def _note_dense(self, pl_module, stage: str) -> None:
        """validate / test / predict of a module nothing sparsified (a dense baseline before fit) runs
        it as it is, and says so."""
        if sparsified_modules(pl_module):
            return
        what = f"pl_module.{self.attr}" if self.recipe is not None else "the LightningModule"
        warnings.warn(f"SparsifyCallback: {stage} runs {what} dense: nothing in it is sparsified yet (the callback "
                      "sparsifies at fit, or as a checkpoint of a sparse run holds it with ckpt_path=...)",
                      stacklevel=2)

    def on_validation_start(self, trainer, pl_module):
        self._note_dense(pl_module, "validate")  # (in a fit, setup made sure something is sparsified)

    def on_test_start(self, trainer, pl_module):
        self._note_dense(pl_module, "test")

    def on_predict_start(self, trainer, pl_module):
        self._note_dense(pl_module, "predict")

    def _target(self, pl_module) -> nn.Module:
        """``pl_module.<attr>``, or an error naming the attribute and what the module holds."""
        return target_of(pl_module, self.attr)

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

    def on_train_start(self, trainer, pl_module):
        self._pending, self._stepped = {}, False
        step_loss(pl_module)  # (forget the losses of an interrupted run)
        # the module's own step counter (restored with its weights) is what the schedule follows:
        # nothing is replayed. Under automatic optimization Lightning's one optimizer makes
        # global_step the same count; under manual optimization it sums every optimizer's steps.
        if trainer.ckpt_path is None or not pl_module.automatic_optimization:
            return
        names = {id(m): n for n, m in pl_module.named_modules()}
        for m in sparsified_modules(pl_module):
            if (step := int(find_state(m).step)) != trainer.global_step:
                warnings.warn(f"SparsifyCallback: {names[id(m)] or 'the module'} is at sparsify step {step} but the "
                              f"trainer resumes at global_step {trainer.global_step}: the schedule follows the "
                              f"module's step {step}, one step per optimizer step from here", stacklevel=2)
                return

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # This hook, not trainer.global_step: under manual optimization global_step counts every
        # optimizer's steps (a GAN's two per batch), and only the hook says which optimizer
        # stepped. It fires for each step Lightning takes, automatic or manual, once per
        # accumulation (not per micro-batch), also for optimizers a strategy wraps (DeepSpeed's
        # is no torch.optim one, which a torch step hook would miss). It fires before the step:
        # sparsify.step runs at the batch end, after the weights moved.
        self._stepped = True
        modules = sparsified_modules(pl_module)
        for m, hit in zip(modules, _updated(optimizer, modules, pl_module)):
            if hit:
                self._pending[id(m)] = self._pending.get(id(m), 0) + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._stepped:  # accumulating: no optimizer step in this batch
            return
        pending, self._pending, self._stepped = self._pending, {}, False
        loss = step_loss(pl_module)  # (outputs["loss"] is the last micro-batch's, divided by the accumulation)
        # Lightning's StochasticWeightAveraging ends with an epoch that only refreshes the
        # BatchNorm statistics: no backward, so its one optimizer step is no training step
        trained = not getattr(trainer.fit_loop, "_skip_backward", False)
        for m in sparsified_modules(pl_module) if trained else ():
            if self._derived is not None and pending.get(id(m)) and m is getattr(pl_module, self.attr, None):
                derived, self._derived = self._derived, None
                _check_manual_total(trainer, pending[id(m)], derived, self._batch_start, self.attr)
            for _ in range(pending.get(id(m), 0)):
                sparsify.step(m, loss)
        self._sync_averages(trainer, pl_module)  # the averaging callbacks listed before this one updated
