"""Checks for sparse training under ``torch.distributed`` (DDP, FSDP2, torchrun).

Nothing here is needed to train: ``sparsify`` state is ordinary parameters and buffers, so DDP
keeps it equal across ranks (gradients are averaged, buffers are broadcast from rank 0 before
every forward, and methods that draw random numbers broadcast them themselves); under FSDP2
(``fully_shard``) ``sparsify.step`` computes thresholds and masks from the gathered full weights
on every rank (docs/distributed.md). These helpers let a run *check* that, e.g. once after the
first step:

>>> import torch, sparsify
>>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", begin=0, end=0, fix=None)
>>> len(state_fingerprint(m)) > 0
True
"""
from __future__ import annotations

import hashlib

import torch
import torch.fx as fx
from torch import nn

from sparsify.core.layers import SparseWeightMixin
from sparsify.core.sharded import full_parameters, is_distributed
from sparsify.core.state import find_state
from sparsify.core.wrappers import unwrap

__all__ = ["state_fingerprint", "assert_synchronized", "is_distributed", "fsdp_units"]


def fsdp_units(model: nn.Module) -> list[list[nn.Module]]:
    """Lists of modules to give FSDP2's ``fully_shard`` one list at a time, before
    ``fully_shard(model)`` itself: the modules the sparsified model's graphs call that hold
    parameters, one list per parent module (e.g. ResNet's ``layer1.0.conv1``, ``layer1.0.bn1``, ...;
``layer2.0.downsample.0`` and ``.1`` form a unit of their own).

    Why not the usual ``fully_shard(block)`` per block: FSDP2 gathers a unit's parameters in the
    forward pre-hook of the modules it was given, and a sparsified model's graph calls a block's
    layers directly, never the block's own forward. Modules called at the top level (a stem
    conv, the classifier) are left to the root's unit.

    >>> import torch, torchvision, sparsify
    >>> m = sparsify.sparsify(torchvision.models.resnet18(), "gmp", total_steps=100,
    ...                       example_inputs=torch.zeros(1, 3, 32, 32))
    >>> units = fsdp_units(m)
    >>> len(units), [type(x).__name__ for x in units[0]][:3]
    (11, ['MagnitudeConv2d', 'BatchNorm2d', 'MagnitudeConv2d'])
    """
    state = find_state(model, where="fsdp_units")
    root = unwrap(model)
    graphs = set(state.graph_paths)
    named = dict(root.named_modules())
    units: dict[str, list[nn.Module]] = {}
    seen: set[int] = set()
    for path in state.graph_paths:
        gm = root.get_submodule(path) if path else root
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            name = f"{path}.{node.target}" if path else str(node.target)
            module = named.get(name)
            # a traced submodule's own nodes are listed from its graph
            if module is None or name in graphs or id(module) in seen or not any(True for _ in module.parameters()):
                continue
            seen.add(id(module))
            parent = name.rpartition(".")[0]
            if parent:
                units.setdefault(parent, []).append(module)
    return list(units.values())


@torch.no_grad()
def state_fingerprint(model: nn.Module) -> str:
    """A hash of everything that decides which weights/activations are zero: every sparsify
    buffer (masks, thresholds, score maps, step) and the effective weight of every sparse layer
    (under FSDP2 a collective: the sharded weights are gathered for it)."""
    state = find_state(model, where="state_fingerprint")
    root = unwrap(model)
    sparse = [m for m in root.modules() if isinstance(m, SparseWeightMixin)]
    with full_parameters([*state.groups.values(), *sparse]):
        return _fingerprint(root, state, sparse)


def _fingerprint(root: nn.Module, state, sparse: list[nn.Module]) -> str:
    h = hashlib.sha256()
    keep = {id(b) for b in state.buffers()}
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
    find_state(model, where="assert_synchronized")  # a wrong argument fails in a test run on one process too
    if not is_distributed():
        return
    mine = state_fingerprint(model)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    if len(set(every)) != 1:
        bad = [r for r, f in enumerate(every) if f != every[0]]
        raise RuntimeError(f"sparsify state differs between ranks (ranks {bad} differ from rank 0): call "
                           "sparsify(...) before wrapping in DDP or fully_shard, seed every rank the same, and call "
                           "sparsify.step(model) on every rank after every optimizer step")
