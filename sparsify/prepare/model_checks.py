"""What ``sparsify`` refuses about the model it is given, before anything is copied or traced: a
parallel wrapper, torch.compile's wrapper, a model already sparsified, lazy layers without their
shapes yet; each error says what to do instead. The kinds of model refused for what they are
(:func:`~sparsify.prepare.model_kinds.refuse_model_kind`) are checked from here too.

Apart from :mod:`sparsify.prepare.build` because ``sparsify.plan`` and ``sparsify.sparsify`` run
:func:`check_model` first, before any recipe problem is reported.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from sparsify.core.state import SparsifyState
from sparsify.methods import SparseWeightMixin
from sparsify.prepare.model_kinds import refuse_model_kind

__all__ = ["check_model"]

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def check_model(model) -> None:
    """Reject what ``sparsify`` cannot take, saying what to do instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify takes a torch.nn.Module, got {type(model).__name__}")
    if type(model).__name__ in _WRAPPERS:
        raise TypeError(f"the model is wrapped in {type(model).__name__}: call sparsify on the plain model "
                        "first, then wrap the result (DDP(sparsify.sparsify(model, recipe)))")
    if hasattr(model, "_orig_mod"):
        raise TypeError("the model was compiled with torch.compile: call sparsify on the plain model, "
                        "then torch.compile the result")
    for name, m in model.named_modules():
        if isinstance(m, (SparsifyState, SparseWeightMixin)):
            raise ValueError(f"the model is already sparsified ({name or 'root'} is "
                             f"{type(m).__name__}): start from the dense model, or call "
                             "sparsify.finalize(model) to get plain modules first")
    refuse_model_kind(model)  # a `sparsify_state` of its own, a ModuleList, a lone Linear
    lazy = [f"{name or 'the root'}: {type(m).__name__}" for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        more = f" and {len(lazy) - 1} more" if len(lazy) > 1 else ""
        raise ValueError(f"the model has lazy layers without their shapes yet ({lazy[0]}{more}): run one forward "
                         "(model(example_batch)) to initialize them, then sparsify")
