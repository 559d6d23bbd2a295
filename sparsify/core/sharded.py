"""Full weights for the moment a method reads them, under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps every parameter as a ``DTensor`` holding this rank's shard; only inside a forward
and backward are the full tensors there. Thresholds, top-k and N:M masks are functions of whole
weights (a global quantile over all layers), so :func:`full_parameters` swaps each sharded
parameter of the given modules for its all-gathered full tensor while ``sparsify.step`` runs,
and afterwards writes the shard of any parameter the step changed (ST-3's and dual's fix steps
write ``W``) back into the ``DTensor``. Every rank then computes the same thresholds and masks
from the same full weights, as under DDP (docs/distributed.md). Buffers (masks, thresholds) are
not sharded by FSDP2 and need nothing.

Without sharded parameters nothing happens:

>>> lin = torch.nn.Linear(2, 2)
>>> with full_parameters([lin]) as gathered:
...     gathered
0
"""
from __future__ import annotations

import atexit
import contextlib
import gc
from typing import Iterable, Iterator

import torch
from torch import nn

from sparsify.core.buffers import eager, layer_buffers

__all__ = ["is_distributed", "is_sharded", "sharded_modules", "full_parameters", "check_gathered", "note_fsdp",
           "collect_at_exit"]

_COLLECTING_AT_EXIT = False


def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is up.

    >>> is_distributed()
    False
    """
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collect_at_exit() -> None:
    """Run the cycle collector once more when the interpreter exits (registered once).

    A sparsified model, like any torch.fx graph, is cyclic garbage when dropped; one still
    uncollected at exit is freed during interpreter teardown, and with it the process group its
    DDP hooks or FSDP2 shards refer to, whose gloo threads then abort the process ("terminate
    called without an active exception"). ``atexit`` handlers run while Python is still whole.
    A model a global name still holds is not garbage: docs/distributed.md says to drop it first.
    """
    global _COLLECTING_AT_EXIT
    if not _COLLECTING_AT_EXIT:
        atexit.register(gc.collect)
        _COLLECTING_AT_EXIT = True


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism).

    >>> is_sharded(torch.zeros(1))
    False
    """
    if not (torch.distributed.is_available() and isinstance(t, torch.Tensor)):
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def check_gathered(module: nn.Module, weight: torch.Tensor) -> None:
    """Raise a clear error when a sparse layer computes with a still-sharded weight.

    FSDP2 gathers a unit's parameters in a forward pre-hook of the modules given to
    ``fully_shard``. A sparsified model's graph calls its layers directly (a ResNet block's own
    forward never runs), so a block given to ``fully_shard`` never gathers its layers' weights.

    >>> check_gathered(torch.nn.Linear(1, 1), torch.zeros(1))
    """
    if type(weight) in (nn.Parameter, torch.Tensor) or not is_sharded(weight):
        return
    raise RuntimeError(f"{type(module).__name__}: its weight is still sharded (FSDP2) when it computes: fully_shard "
                       "was given a module the sparsified model never calls (its graph calls the layers directly, "
                       "not their blocks); shard the units of sparsify.integrations.distributed.fsdp_units(model), "
                       "or the layers themselves, then the model (docs/distributed.md)")


def note_fsdp(module: nn.Module) -> bool:
    """Whether FSDP2 manages ``module``'s parameters (given to ``fully_shard``, or a parameter
    sharded right now, i.e. outside its forward); if so, its buffers
    (:mod:`sparsify.core.buffers`) become transient from now on: a full-size tensor kept per layer
    on every rank would outweigh the rank's parameter shards (docs/distributed.md).

    Nothing is noted while compiled or traced (False): compiled code must not read the buffers'
    weak map, which dynamo would guard on; ``sparsify.step`` notes it eagerly.

    >>> note_fsdp(torch.nn.Linear(1, 1))
    False
    """
    if not is_distributed() or not eager():
        return False
    bufs = layer_buffers(module, create=False)
    if bufs is not None and bufs.transient:
        return True
    from torch.distributed.fsdp import FSDPModule
    if not (isinstance(module, FSDPModule) or any(is_sharded(p) for p in module._parameters.values())):
        return False
    layer_buffers(module).make_transient()
    return True


def sharded_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules (each once, in order) that hold a sharded parameter of their own.

    >>> sharded_modules([torch.nn.Linear(1, 1)])
    []
    """
    out, seen = [], set()
    for m in modules:
        if id(m) not in seen and any(is_sharded(p) for p in m._parameters.values()):
            seen.add(id(m))
            out.append(m)
    return out


@contextlib.contextmanager
def full_parameters(modules: Iterable[nn.Module]) -> Iterator[int]:
    """Within the block, each sharded parameter of ``modules`` (their own, not their children's)
    is a plain ``nn.Parameter`` holding the full tensor; on exit the sharded ones are put back,
    with the shard of every parameter written in the block updated. Yields how many parameters
    were gathered. A collective: every rank must enter it with the same modules in the same order.
    """
    from torch.distributed.tensor import distribute_tensor
    swapped: list[tuple[nn.Module, str, torch.Tensor, nn.Parameter, int]] = []
    try:
        with torch.no_grad():
            for m in sharded_modules(modules):
                for name, p in list(m._parameters.items()):
                    if not is_sharded(p):
                        continue
                    full = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    # like FSDP2's own swap of sharded and unsharded parameters: no __setattr__ checks
                    m._parameters[name] = full
                    swapped.append((m, name, p, full, full._version))
        yield len(swapped)
    finally:
        with torch.no_grad():
            for m, name, sharded, full, version in swapped:
                if full._version != version:  # written in the block: keep this rank's part of it
                    part = distribute_tensor(full.detach(), sharded.device_mesh, sharded.placements,
                                             src_data_rank=None)  # every rank holds the same full tensor
                    sharded.to_local().copy_(part.to_local())
                m._parameters[name] = sharded
