"""The wrappers that hold a user's module: DDP / DataParallel / FSDP / ``torch.compile``, and the
weight-averaging ones that hold a copy as ``.module`` (torch's ``AveragedModel``, timm's
``ModelEma*``). Apart from the state because they are told by class name alone, and every layer
that takes a user's model unwraps it.
"""
from __future__ import annotations

from torch import nn

__all__ = ["AVERAGING_WRAPPERS", "is_wrapper", "unwrap"]

# matched by name, so that neither torch.distributed nor timm is imported here
AVERAGING_WRAPPERS = ("AveragedModel", "ModelEma", "ModelEmaV2", "ModelEmaV3")  # torch's, timm's
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel") + AVERAGING_WRAPPERS


def is_wrapper(model, names: tuple[str, ...] = AVERAGING_WRAPPERS) -> bool:
    """Whether ``model``'s class, or a class it derives from, is called one of ``names``
    (torchvision's reference scripts keep their EMA in a subclass of ``AveragedModel``).

    >>> from torch.optim.swa_utils import AveragedModel
    >>> class ExponentialMovingAverage(AveragedModel): pass
    >>> is_wrapper(ExponentialMovingAverage(nn.Linear(1, 1)))
    True
    """
    return any(c.__name__ in names for c in type(model).__mro__)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP / torch.compile wrappers, and inside the
    weight-averaging wrappers that hold a copy as ``.module`` (torch's ``AveragedModel``, timm's
    ``ModelEmaV2`` / ``ModelEmaV3``), so that ``report`` and ``finalize`` take an EMA as it is."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif is_wrapper(model, _WRAPPERS) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model
