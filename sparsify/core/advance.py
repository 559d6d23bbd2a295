"""One optimizer step of a sparsified model's schedules: what ``sparsify.step`` does once it has
checked its arguments (split from the API so that each file holds one thing)."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.core.buffers import release_workspaces
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.sharded import collect_at_exit, full_parameters, is_distributed, note_fsdp, sharded_modules
from sparsify.core.state import SparsifyState

__all__ = ["advance"]


@torch.no_grad()
def advance(state: SparsifyState, root: nn.Module, loss: float | None, said: list[tuple[str, str]]) -> int:
    """Count one optimizer step on ``state`` (of the unwrapped model ``root``) and give every group
    its update for it; what should be warned goes to ``said`` as (key, message). Returns the new
    step count. A group's :meth:`~sparsify.core.contract.Group.refuse_step` raises its
    ``RuntimeError`` before anything changes; a group whose update raises (a method of the user's)
    misses the step while the others take it, and a ``RuntimeError`` naming it follows.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=10)
    >>> advance(m.sparsify_state, m, None, [])
    1
    """
    for group in state.groups.values():  # before anything moves: a caught refusal leaves the run as it was
        if (why := group.refuse_step()) is not None:
            raise RuntimeError(why)
    counted = getattr(state, "_stepped", None)  # None: a model pickled before it was kept
    if counted and is_distributed() and int(state.step) != counted:
        # only a raw write changes the counter between steps: DDP's broadcast of rank 0's buffers
        # (not said before this rank's first step or load: a checkpoint loaded on rank 0 alone
        # reaches the others by DDP's first broadcast on purpose)
        said.append(("rank_missed_step", f"sparsify.step: this rank's step counter is {int(state.step)}, but its "
                     f"last sparsify.step left it at {counted}: DDP's broadcast gave it rank 0's, so this rank "
                     "called sparsify.step fewer (or more) times than rank 0; call it on every rank after every "
                     "optimizer step (docs/distributed.md)"))
    state.step += 1
    t = int(state.step)
    state.__dict__["_stepped"] = t
    members = [m for m in state.members() if isinstance(m, SparseWeightMixin)]
    # an optimizer may write a weight without bumping its version counter (torch's fused AdamW
    # and SGD kernels, the default of transformers' Trainer; writes through .data): nothing a
    # layer computed from its weight before this step is reused after it
    for m in members:
        m.drop_caches()
    # FSDP2: the groups that read weights this step see them whole (docs/distributed.md)
    readers = [m for g in state.groups.values() if g.reads_weights(t) for m in (g, *g.members.values())]
    failed = []
    with full_parameters(readers):
        for name, group in state.groups.items():
            group.clear()
            try:
                group.update(t, loss)
            except FloatingPointError as e:  # non-finite weights: keep the last thresholds and masks
                said.append((f"nonfinite:{name}", f"sparsify.step: {name} ({group.method_name}) met "
                             f"non-finite weights at step {t} and kept its previous thresholds and masks ({e})"))
            except Exception as e:  # (a method of the user's) the other groups still take the step
                failed.append((name, group, e))
    if is_distributed():
        collect_at_exit()
    if is_distributed() and sharded_modules(root.modules()):
        # FSDP2 gathers new weight values into the same tensor without bumping its version:
        # nothing computed from a weight in this step's forward may be reused in the next one;
        # and no full-size tensor stays alive until then (docs/distributed.md, "Memory under FSDP2")
        for m in members:
            note_fsdp(m)
            m.drop_caches(free=True)
        release_workspaces()  # sized to the largest weight or activation the thread met
    if failed:
        raise RuntimeError(_failure_message(state, failed, t)) from failed[0][2]
    return t


def _failure_message(state: SparsifyState, failed: list, t: int) -> str:
    """One line naming every group whose update raised at step ``t`` and the groups that took it."""
    (name, group, e), *more = failed
    said = f"sparsify.step: {name} ({group.method_name}) raised at step {t}: {type(e).__name__}: {e}"
    said += "".join(f"; {n} ({g.method_name}) raised too: {type(x).__name__}: {x}" for n, g, x in more)
    missed = [n for n, _, _ in failed]
    others = [n for n in state.groups if n not in missed]
    if others:
        said += f"; the other groups ({', '.join(others)}) took step {t}, {' and '.join(missed)} missed it"
    return said
