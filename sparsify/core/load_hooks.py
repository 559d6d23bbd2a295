"""The ``load_state_dict`` pre-hook of a sparsified model (``after_load``, the post-hook, is in
:mod:`sparsify.core.state`): why it refuses and what it drops is in :mod:`sparsify.core.load_check`."""
from __future__ import annotations

from torch import nn

from sparsify.core.load_check import moved_keys, run_difference
from sparsify.core.records import RecordsMixin
from sparsify.core.state import STATE_ATTR, SparsifyState

__all__ = ["before_load"]


def before_load(module: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                error_msgs) -> None:
    """``load_state_dict`` pre-hook of a sparsified model: a checkpoint made by another
    ``sparsify(...)`` call (recipe, overrides or ``total_steps``) is refused before any of it is
    loaded (a checkpoint without sparsify state, a dense one, passes: ``after_load`` handles it);
    otherwise the terms recorded for a penalty not yet collected are dropped, and entries of
    inserted modules saved under their former names are renamed (:func:`moved_keys`)."""
    state = module._modules.get(STATE_ATTR)
    if not isinstance(state, SparsifyState):
        return
    state.load_prefix = prefix  # where this model's keys start: after_load names the layers a checkpoint lacks
    saved = state_dict.get(f"{prefix}{STATE_ATTR}._extra_state")
    why = None if saved is None else run_difference(saved, state.recipe_json, state.total_steps)
    if why:
        raise RuntimeError(f"load_state_dict: this checkpoint was made by another sparsify(...) call than the model "
                           f"it is loaded into ({why}); nothing was loaded: build the model with the same "
                           "recipe, overrides and total_steps before load_state_dict")
    for member in state.members():  # their graph holds the weights as they were (load_check.py)
        if isinstance(member, RecordsMixin):
            member.loaded()
    # (a name moved out of a container has a "_" where the container's "." was)
    members = {id(m) for m in state.members()}
    own = [f"{prefix}{name}.{key}" for name, m in module.named_modules() if id(m) in members and "_" in name
           for key in m.state_dict()]
    for old, new in moved_keys([k for k in state_dict if k.startswith(prefix)], own).items():
        state_dict[new] = state_dict.pop(old)
