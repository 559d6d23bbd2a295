"""A Hugging Face ``transformers.Trainer`` callback: adds ``sparsify.penalty`` to the model's
``loss`` output and calls ``sparsify.step`` after every optimizer step.

>>> from sparsify.integrations.huggingface import SparsifyTrainerCallback       # doctest: +SKIP
>>> model = sparsify.sparsify(model, "st3", example_inputs=(input_ids,), total_steps=1000)  # doctest: +SKIP
>>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsifyTrainerCallback()])  # doctest: +SKIP

transformers models do not trace whole with torch.fx: ``sparsify`` falls back to tracing their
children one by one (see docs/transformers.md for the share of Linear layers each recipe reaches).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

import sparsify
from sparsify.core.schedule_end import schedule_short
from sparsify.core.state import find_state
from sparsify.prepare.plan_entry import once

__all__ = ["SparsifyTrainerCallback", "linear_share", "penalty_share", "step_loss"]


def linear_share(model: nn.Module) -> dict:
    """How many ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's transposed Linears) of a
    sparsified model were rewritten, by the plan."""
    plan = find_state(model, where="linear_share").plan
    lin = [e for e in once(plan.entries) if e.kind.endswith("Linear") or e.kind == "Conv1D"]  # a layer called twice: once
    done = [e for e in lin if e.method is not None]
    return {"linear": len(lin), "rewritten": len(done),
            "param_share": sum(e.params for e in done) / max(1, sum(e.params for e in lin))}


def _loss_of(output):
    """The loss a transformers model returned (a ``ModelOutput``/dict's ``loss``; with
    ``return_dict=False``, the first element when labels were given), else None."""
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
        return output[0]
    return None


def _with_loss(output, loss):
    if isinstance(output, dict):
        output["loss"] = loss
        return output
    return (loss, *output[1:])


def _shifts_labels(model) -> bool:
    """The Trainer's own rule for counting a causal LM's items as ``labels[..., 1:]``."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return False
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def penalty_share(model: nn.Module, kwargs: dict):
    """The weight of this forward's penalty in an optimizer step of ``transformers.Trainer``, or
    None when the Trainer applies it itself.

    Without ``num_items_in_batch`` the Trainer divides each micro-batch's loss by the number of
    micro-batches it accumulates, the penalty with it. With it (models that take loss kwargs,
    when labels are given), the loss is already a sum over the whole accumulated batch divided
    by its item count (across processes with ``average_tokens_across_devices``, where the
    Trainer then multiplies by the number of processes and DDP averages) and is not divided:
    the penalty added at full weight to every micro-batch would count once per micro-batch. It
    gets the micro-batch's share of the items instead, the weight its loss terms have, so the
    shares of one optimizer step add up to 1 on one process and on several.

    >>> import torch
    >>> labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    >>> float(penalty_share(torch.nn.Linear(1, 1), {"labels": labels, "num_items_in_batch": torch.tensor(12)}))
    0.25
    >>> penalty_share(torch.nn.Linear(1, 1), {"labels": labels}) is None
    True
    """
    total = kwargs.get("num_items_in_batch")
    if total is None:
        return None
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if labels is not None and _shifts_labels(model):
            labels = labels[..., 1:]
    if not isinstance(labels, torch.Tensor):
        raise ValueError("sparsify: the Trainer passed num_items_in_batch without labels, so the penalty's share of "
                         "the accumulated batch is unknown; pass labels in the batch")
    return labels.ne(-100).sum() / total


def _add_penalty(module, args, kwargs, output, losses: list | None = None):
    loss = _loss_of(output) if module.training else None
    if loss is None:
        # no loss to add to (Trainer's label smoothing or compute_loss_func computes it outside
        # the model): the terms stay recorded, and sparsify.step warns that they were never
        # collected unless the user's loss function adds sparsify.penalty(model)
        return output
    if losses is not None:
        losses.append((loss.detach(), kwargs.get("num_items_in_batch") is not None))
    penalty = sparsify.penalty(module)
    if not isinstance(penalty, torch.Tensor):
        return output
    share = penalty_share(module, kwargs)
    return _with_loss(output, loss + (penalty if share is None else penalty * share))


def step_loss(losses: list) -> float | None:
    """The training loss of one optimizer step from its micro-batches' ``(loss, normalized)``:
    their sum where the Trainer normalized each over the whole accumulated batch, else their mean.

    >>> step_loss([(torch.tensor(1.0), False), (torch.tensor(3.0), False)])
    2.0
    >>> step_loss([(torch.tensor(1.0), True), (torch.tensor(3.0), True)]), step_loss([])
    (4.0, None)
    """
    if not losses:
        return None
    total = torch.stack([v.float() for v, _ in losses]).sum()
    return float(total if all(n for _, n in losses) else total / len(losses))


class SparsifyTrainerCallback(TrainerCallback):
    """Drives a model made by ``sparsify.sparsify`` inside ``transformers.Trainer``: adds the
    penalty to the model output's loss, weighted as the Trainer weights that loss under gradient
    accumulation (:func:`penalty_share`), calls ``sparsify.step`` with the step's training loss
    after every optimizer step (semi-structured keeps the mask map of the lowest loss; a
    non-finite loss is reported), and warns before training when the run is shorter than the
    recipe's schedules."""

    def __init__(self):
        self._hook = None
        self._losses: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        find_state(model, where="SparsifyTrainerCallback").in_trainer = True  # (a clear error when not sparsified)
        if state.max_steps and (short := schedule_short(model, state.max_steps)):
            warnings.warn(short + " (SparsifyTrainerCallback: TrainingArguments give the run's length)", stacklevel=2)
        if self._hook is None:
            self._losses = []
            self._hook = model.register_forward_hook(functools.partial(_add_penalty, losses=self._losses),
                                                     with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # once per optimizer step (after gradient accumulation), with the loss of its micro-batches
        sparsify.step(model, step_loss(self._losses))
        self._losses.clear()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # a save_pretrained after training (trainer.save_model()) is no checkpoint: it warns
        find_state(model).in_trainer = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
