"""The training loop of the README, shared by tests that train a model: whole runs compared
across setups (compile, DDP) and the few steps a method's tests take before checking its state."""
from __future__ import annotations

import torch.nn.functional as F
import torch.optim

import sparsify


def run_steps(model, opt, batches, *, call=None, penalty=False, after=None, loss_of=None) -> list[float]:
    """One ``opt`` step per ``(x, y)`` in ``batches`` on the cross-entropy loss, each followed by
    ``sparsify.step(model)``. ``penalty`` makes it the README's loop: ``sparsify.penalty(model)``
    added to the loss, and the loss handed to ``sparsify.step``. ``call`` runs the forward
    (default: ``model`` itself, e.g. a compiled or DDP-wrapped one); ``after()`` runs after each
    step (e.g. an EMA update and ``sparsify.sync``); ``loss_of(x, y)`` replaces the forward and
    the cross-entropy (a transformers model's own loss). Returns the losses."""
    call = model if call is None else call  # a compiled wrapper has no truth value (len())
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(call(x), y) if loss_of is None else loss_of(x, y)
        if penalty:
            loss = loss + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model, loss if penalty else None)
        if after is not None:
            after()
        losses.append(float(loss.detach()))
    return losses


def train(model, batches, call=None) -> list[float]:
    """SGD over ``batches`` of ``(x, y)`` the way users are told to: task loss + penalty,
    ``sparsify.step(model, loss)`` after each optimizer step. ``call`` runs the forward
    (default: ``model`` itself, e.g. a compiled or DDP-wrapped one). Returns the losses."""
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    return run_steps(model, opt, batches, call=call, penalty=True)


def rank_state(state_dict: dict) -> tuple[dict, dict]:
    """A ``state_dict`` as two parts compared across DDP / FSDP ranks: the tensors (weights, masks,
    thresholds, score maps, step), and each module's extra state as plain data without a random
    generator's state (semi-structured: rank 0 draws the score maps for every rank, the others'
    generators are never used)."""
    from sparsify.core.extra_state import unpack
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    extra = {k: {n: x for n, x in unpack(v).items() if n != "generator"}
             for k, v in state_dict.items() if k.endswith("_extra_state")}
    return tensors, extra
