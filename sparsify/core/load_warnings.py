"""The warnings of a ``load_state_dict`` into a sparsified model that loads less than a whole
sparsified checkpoint (:func:`sparsify.core.state.after_load` calls them): some sparse layers'
entries missing, or the record of the recipe and ``total_steps`` that checks a checkpoint against
the model. ``partial_load`` marks the library's own partial loads, which are not warned."""
from __future__ import annotations

import contextlib
import warnings

from torch import nn

__all__ = ["partial_load", "warn_partial", "warn_unrecorded"]


def warn_unrecorded(state, key: str) -> None:
    """A sparsified checkpoint without its record of recipe and ``total_steps`` (a user dropped it to
    load the run into a model built for more steps, which the record would refuse): said, with the
    step it goes on from."""
    if state is None or state.step.is_meta:
        return
    warnings.warn(f"sparsify: a sparsified checkpoint without {key} was loaded: its step ({int(state.step)}), masks "
                  "and thresholds were not checked against this model's recipe and total_steps "
                  f"({state.total_steps} here) and go on under them; schedule times given as fractions now fall on "
                  "other steps than in the saved run", stacklevel=4)


_PARTIAL_LOADS = [0]  # > 0 while the library loads a part of a state_dict on purpose (sparsify.sync)


@contextlib.contextmanager
def partial_load():
    """A ``load_state_dict(..., strict=False)`` of some entries on purpose: not warned."""
    _PARTIAL_LOADS[0] += 1
    try:
        yield
    finally:
        _PARTIAL_LOADS[0] -= 1


def warn_partial(module: nn.Module, state, missing: list[str]) -> None:
    """A sparsified checkpoint loaded with ``strict=False`` that lacks some sparse layers' entries:
    those layers keep what they held (a fresh model's masks and thresholds) at the loaded step,
    and the schedule cannot redo their history (gmp ended 0.8% sparse of a 90% target)."""
    if _PARTIAL_LOADS[0] or not missing:  # (a whole checkpoint: no state_dict walk below)
        return
    # (left in missing_keys, as torch does: safetensors' load_model expects a tied duplicate it
    # left out of the file there, and calls it unexpected otherwise)
    missing = _untied(module, getattr(state, "load_prefix", None) or "", missing)
    # members holding values (a regularizer node's only state is whether it is active)
    members = {id(m) for m in state.members() if any(True for _ in m.parameters(recurse=False))
               or any(True for _ in m.buffers(recurse=False))}
    names = [name for name, m in module.named_modules() if id(m) in members and name]
    # keys are the loaded module's: ours, or a wrapper's holding this model (module.<name>....), whose
    # prefix the pre-hook saw (a dense layer's key holding ".fc." is not the sparse fc's)
    prefix = getattr(state, "load_prefix", None)  # None: a model pickled before it existed
    if prefix is None:
        short = [name for name in names if any(k.startswith(name + ".") or f".{name}." in k for k in missing)]
    else:
        short = [name for name in names if any(k.startswith(f"{prefix}{name}.") for k in missing)]
    if short:
        warnings.warn(f"sparsify: the checkpoint loaded at step {int(state.step)} holds no entries for {len(short)} "
                      f"sparse layer(s) ({', '.join(short[:3])}{' ...' if len(short) > 3 else ''}; strict=False "
                      "took the rest): they keep the masks, thresholds and weights they had before the load, not "
                      "the saved run's, and will not reach the recipe's sparsity as that run would; load a "
                      "checkpoint of the same model (keys renamed by a library are a common cause)", stacklevel=4)


def _untied(module: nn.Module, prefix: str, missing: list[str]) -> list[str]:
    """``missing`` without the keys of tensors the checkpoint loaded under another name: a tied
    head's weight, which transformers leaves out of save_pretrained folders and Trainer
    checkpoints (its embedding's entry restores it, as transformers' from_pretrained counts it)."""
    entries = module.state_dict(prefix=prefix, keep_vars=True)
    gone = set(missing)
    loaded = {id(v) for k, v in entries.items() if k not in gone}
    return [k for k in missing if k not in entries or id(entries[k]) not in loaded]
