"""The training loop of the README, shared by tests that compare runs (compile, DDP)."""
from __future__ import annotations

import torch.nn.functional as F
import torch.optim

import sparsify


def train(model, batches, call=None) -> list[float]:
    """SGD over ``batches`` of ``(x, y)`` the way users are told to: task loss + penalty,
    ``sparsify.step(model, loss)`` after each optimizer step. ``call`` runs the forward
    (default: ``model`` itself, e.g. a compiled or DDP-wrapped one). Returns the losses."""
    call = call or model
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(call(x), y) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model, loss)
        losses.append(float(loss.detach()))
    return losses
