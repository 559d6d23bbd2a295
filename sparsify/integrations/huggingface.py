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


def penalty_share(kwargs: dict, micro_batches: int, loss_scale: int = 1):
    """The weight of this forward's penalty in an optimizer step of ``transformers.Trainer`` that
    accumulates ``micro_batches`` micro-batches, or None when the Trainer applies it itself.

    The penalty is a mean over activation elements, as a step on the whole batch would take it:
    each micro-batch weighs its share of the step's samples, ``1 / micro_batches`` (a short last
    micro-batch weighs as a full one, as the Trainer weighs the loss of a model that takes no
    ``num_items_in_batch``). Without ``num_items_in_batch`` the Trainer divides each micro-batch's
    loss by ``micro_batches`` itself, the penalty with it. With it (models that take loss kwargs,
    when labels are given) the loss is already a sum over the whole accumulated batch divided by
    its item count and is not divided; under ``average_tokens_across_devices`` the Trainer also
    multiplies it by the number of processes (``loss_scale``) and DDP averages the gradients, so
    the share is divided by ``loss_scale``: the shares of one optimizer step add up to 1 on one
    process and on several. The share does not depend on the labels: a micro-batch whose labels
    are all -100 has activations all the same.

    >>> penalty_share({"num_items_in_batch": torch.tensor(12)}, micro_batches=4)
    0.25
    >>> penalty_share({"num_items_in_batch": torch.tensor(12)}, micro_batches=4, loss_scale=2)
    0.125
    >>> penalty_share({}, micro_batches=4) is None
    True
    """
    if kwargs.get("num_items_in_batch") is None:
        return None
    return 1 / (micro_batches * loss_scale)


def _micro_batches(args, state, train_dataloader) -> int:
    """The Trainer's ``current_gradient_accumulation_steps`` for the optimizer step about to run:
    ``gradient_accumulation_steps``, the rest in an epoch's last step when the epoch's micro-batches
    do not divide evenly (the Trainer's own rule, from the per-process dataloader's length)."""
    acc = args.gradient_accumulation_steps
    try:
        n = len(train_dataloader)
    except TypeError:  # no length (an iterable dataset, or none given): the Trainer takes acc each step
        return acc
    per_epoch = max(n // acc + int(n % acc > 0), 1)
    return acc if state.global_step % per_epoch != per_epoch - 1 else (n % acc or acc)


def _loss_scale(args, model) -> int:
    """What the Trainer multiplies a loss normalized by ``num_items_in_batch`` by (processes
    averaging their item counts, less tensor-parallel replicas)."""
    if not getattr(args, "average_tokens_across_devices", False):
        return 1
    if args.n_gpu > 1:
        return args.n_gpu
    return max(args.world_size // (getattr(model, "_tp_size", None) or 1), 1)


def _add_penalty(module, args, kwargs, output, losses: list | None = None, weights: dict | None = None):
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
    share = penalty_share(kwargs, **(weights or {"micro_batches": 1}))
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
    penalty to the model output's loss, each micro-batch's at its share of the optimizer step
    (:func:`penalty_share`), calls ``sparsify.step`` with the step's training loss after every
    optimizer step (semi-structured keeps the mask map of the lowest loss; a non-finite loss is
    reported), and warns before training when the run is shorter than the recipe's schedules."""

    def __init__(self):
        self._hook = None
        self._losses: list = []
        self._weights: dict = {"micro_batches": 1, "loss_scale": 1}  # the hook reads them at each forward

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        find_state(model, where="SparsifyTrainerCallback").in_trainer = True  # (a clear error when not sparsified)
        if state.max_steps and (short := schedule_short(model, state.max_steps)):
            warnings.warn(short + " (SparsifyTrainerCallback: TrainingArguments give the run's length)", stacklevel=2)
        self._weights.update(micro_batches=args.gradient_accumulation_steps, loss_scale=_loss_scale(args, model))
        if self._hook is None:
            self._losses = []
            self._hook = model.register_forward_hook(
                functools.partial(_add_penalty, losses=self._losses, weights=self._weights), with_kwargs=True)

    def on_step_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # before the step's first micro-batch: how many micro-batches it accumulates
        self._weights["micro_batches"] = _micro_batches(args, state, train_dataloader)

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
