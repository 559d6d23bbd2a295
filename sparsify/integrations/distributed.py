"""Checks for sparse training under ``torch.distributed`` (DDP, torchrun).

Nothing here is needed to train: ``sparsify`` state is ordinary parameters and buffers, so DDP
keeps it equal across ranks (gradients are averaged, buffers are broadcast from rank 0 before
every forward, and methods that draw random numbers broadcast them themselves). These helpers
let a run *check* that, e.g. once after the first step:

>>> import torch, sparsify
>>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=0, fix=None)
>>> len(state_fingerprint(m)) > 0
True
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import find_state, unwrap

__all__ = ["state_fingerprint", "assert_synchronized", "is_distributed"]


def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def state_fingerprint(model: nn.Module) -> str:
    """A hash of everything that decides which weights/activations are zero: every sparsify
    buffer (masks, thresholds, score maps, step) and the effective weight of every sparse layer."""
    root = unwrap(model)
    state = find_state(root)
    h = hashlib.sha256()
    keep = {id(b) for b in state.buffers()}
    sparse = [m for m in root.modules() if isinstance(m, SparseWeightMixin)]
    for m in sparse:
        keep.update(id(b) for b in m.buffers(recurse=False))
    for name, b in root.named_buffers():
        if id(b) in keep:
            h.update(name.encode())
            h.update(b.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for m in sparse:
        w = m.effective_weight().detach().float().cpu().contiguous()
        h.update(w.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_synchronized(model: nn.Module) -> None:
    """Raise on every rank if the sparsify state differs between ranks (no-op without a process
    group). Costs one all-gather of a 64-character string."""
    if not is_distributed():
        return
    mine = state_fingerprint(model)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    if len(set(every)) != 1:
        bad = [r for r, f in enumerate(every) if f != every[0]]
        raise RuntimeError(f"sparsify state differs between ranks (ranks {bad} differ from rank 0): call "
                           "sparsify(...) before wrapping in DDP, seed every rank the same, and call "
                           "sparsify.step(model) on every rank after every optimizer step")
