"""A Hugging Face ``transformers.Trainer`` callback: adds ``sparsify.penalty`` to the model's
``loss`` output and calls ``sparsify.step`` after every optimizer step.

>>> from sparsify.integrations.huggingface import SparsifyTrainerCallback       # doctest: +SKIP
>>> model = sparsify_transformer(model, "st3", example_inputs=(input_ids,), total_steps=1000)  # doctest: +SKIP
>>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsifyTrainerCallback()])  # doctest: +SKIP

transformers models do not trace whole with torch.fx: ``sparsify`` falls back to tracing their
children one by one (see docs/integrations.md for the share of Linear layers each recipe reaches).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

import sparsify
from sparsify.core.state import find_state

__all__ = ["SparsifyTrainerCallback", "linear_share"]


def linear_share(model: nn.Module) -> dict:
    """How many ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's transposed Linears) of a
    sparsified model were rewritten, by the plan."""
    plan = find_state(model).plan
    lin = [e for e in plan.entries if e.kind.endswith("Linear") or e.kind == "Conv1D"]
    done = [e for e in lin if e.method is not None]
    return {"linear": len(lin), "rewritten": len(done),
            "param_share": sum(e.params for e in done) / max(1, sum(e.params for e in lin))}


def _add_penalty(module, args, output):
    if not module.training:
        return output
    penalty = sparsify.penalty(module)
    if isinstance(penalty, torch.Tensor) and getattr(output, "loss", None) is not None:
        output["loss"] = output["loss"] + penalty
    return output


class SparsifyTrainerCallback(TrainerCallback):
    """Drives a model made by ``sparsify.sparsify`` inside ``transformers.Trainer``."""

    def __init__(self):
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        find_state(model)  # a clear error when the model was not sparsified
        if self._hook is None:
            self._hook = model.register_forward_hook(_add_penalty)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        sparsify.step(model)  # called once per optimizer step (after gradient accumulation)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
