"""How many ``sparsify.step`` s SparsifyCallback owes each sparsified module: which modules an
optimizer step updates, how many steps a manual-optimization run gives a module, and the warning
when the ``total_steps`` taken from the trainer is not that.

Apart from :mod:`sparsify.integrations.lightning` because these read only the optimizer and the
trainer's run length; what they need of the callback's state comes as arguments.
"""
from __future__ import annotations

import math
import warnings

from torch import nn


def _updated(optimizer, modules: list[nn.Module], pl_module: nn.Module) -> list[bool]:
    """Which of ``modules`` ``optimizer`` updates (holds a parameter of)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    hit = [any(id(p) in held for p in m.parameters()) for m in modules]
    if any(hit) or any(id(p) in held for p in pl_module.parameters()):
        return hit
    # it holds copies, none of the module's own tensors (DeepSpeed ZeRO's flat partitions): which
    # module it updates cannot be told, and such a strategy runs this one optimizer for them all
    return [True] * len(modules)


def _manual_run_steps(trainer, mine: int, all_steps: int) -> int | None:
    """The optimizer steps a module gets in a manual-optimization run whose batches give it
    ``mine`` of their ``all_steps`` steps (max_steps counts every optimizer's steps)."""
    ends = []
    if trainer.max_epochs not in (None, -1) and math.isfinite(trainer.num_training_batches):
        ends.append(int(trainer.num_training_batches) * trainer.max_epochs * mine)
    if trainer.max_steps not in (None, -1):
        ends.append(trainer.max_steps * mine // all_steps)
    return min(ends) if ends else None


def _check_manual_total(trainer, mine: int, derived: int, batch_start: int, attr: str) -> None:
    """Under manual optimization, whether the total_steps taken from the trainer (``derived``) matches
    the steps this batch's share of optimizer steps (``mine`` since ``batch_start``) gives
    ``pl_module.<attr>`` over the run."""
    # called straight from the callback's on_train_batch_end: stacklevel=2 still names that hook
    expected = _manual_run_steps(trainer, mine, max(trainer.global_step - batch_start, mine))
    if expected is not None and expected != derived:
        warnings.warn(f"SparsifyCallback: pl_module.{attr} took {mine} of the "
                      f"{trainer.global_step - batch_start} optimizer steps of this batch, so the run "
                      f"gives it about {expected} steps, not total_steps={derived} (the Trainer's "
                      f"estimated_stepping_batches): pass SparsifyCallback(..., total_steps={expected})",
                      stacklevel=2)
