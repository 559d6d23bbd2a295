"""A PyTorch Lightning callback: adds ``sparsify.penalty`` to the training loss and calls
``sparsify.step`` after every optimizer step.

>>> from sparsify.integrations.lightning import SparsifyCallback      # doctest: +SKIP
>>> trainer = lightning.Trainer(max_steps=1000, callbacks=[SparsifyCallback("st3", attr="net")])  # doctest: +SKIP

With ``recipe`` and ``attr`` the callback sparsifies ``pl_module.<attr>`` itself at ``setup``
(before ``configure_optimizers`` runs), with ``total_steps = trainer.estimated_stepping_batches``.
Without them it drives every submodule the user already sparsified.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

import sparsify
from sparsify.core.state import find_state

__all__ = ["SparsifyCallback", "sparsified_modules"]


def sparsified_modules(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` (itself included) made by ``sparsify.sparsify``."""
    found, skip = [], set()
    for name, m in module.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if find_state(m, required=False) is not None:
            found.append(m)
            skip.add(name)
    return found


class SparsifyCallback(pl.Callback):
    """Penalty in the loss, ``sparsify.step`` after each optimizer step (gradient accumulation
    respected: it follows ``trainer.global_step``)."""

    def __init__(self, recipe=None, attr: str | None = None, **sparsify_kwargs):
        super().__init__()
        if (recipe is None) != (attr is None):
            raise ValueError("give both recipe and attr (the LightningModule attribute to sparsify), or neither")
        self.recipe, self.attr, self.kwargs = recipe, attr, sparsify_kwargs
        self._last_step = None

    def setup(self, trainer, pl_module, stage=None):
        if self.recipe is not None and stage in (None, "fit") and \
                find_state(getattr(pl_module, self.attr), required=False) is None:
            kwargs = dict(self.kwargs)
            kwargs.setdefault("total_steps", int(trainer.estimated_stepping_batches))
            setattr(pl_module, self.attr, sparsify.sparsify(getattr(pl_module, self.attr), self.recipe, **kwargs))
        if not sparsified_modules(pl_module):
            raise RuntimeError("SparsifyCallback: no sparsified module in the LightningModule; pass "
                               "SparsifyCallback(recipe, attr='net') or sparsify the network yourself")
        if not getattr(pl_module, "_sparsify_penalty_wrapped", False):
            original = pl_module.training_step

            def training_step(*args, **kwargs):
                out = original(*args, **kwargs)
                penalty = sum((sparsify.penalty(m) for m in sparsified_modules(pl_module)), 0.0)
                if isinstance(penalty, float) and penalty == 0.0:
                    return out
                if isinstance(out, dict):
                    return {**out, "loss": out["loss"] + penalty}
                return out + penalty
            pl_module.training_step = training_step
            pl_module._sparsify_penalty_wrapped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._last_step is None:
            self._last_step = 0
        if trainer.global_step > self._last_step:  # an optimizer step happened in this batch
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            for m in sparsified_modules(pl_module):
                for _ in range(trainer.global_step - self._last_step):
                    sparsify.step(m, loss if isinstance(loss, torch.Tensor) else None)
            self._last_step = trainer.global_step
        else:  # accumulating: forget penalties recorded by this micro-batch's forward
            pass

    def state_dict(self):
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict):
        self._last_step = state_dict.get("last_step")
