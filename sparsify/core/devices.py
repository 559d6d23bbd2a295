"""Device helpers every method shares, so that code written once runs on any device (CPU, CUDA,
and ``meta`` for shape-only runs and tests).

>>> with no_autocast("meta"):
...     autocast_dtype(torch.zeros(1, device="meta")) is None
True
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["no_autocast", "autocast_dtype", "model_device", "move_buffers"]


# device type -> whether autocast exists there. Remembered: torch 2.11's dynamo skips
# torch.amp.is_autocast_available, which broke the graph at every STR layer under torch.compile
_AUTOCAST: dict[str, bool] = {}


def _has_autocast(device_type: str) -> bool:
    known = _AUTOCAST.get(device_type)
    if known is None:
        check = getattr(torch.amp, "is_autocast_available", None)
        known = _AUTOCAST[device_type] = device_type in ("cpu", "cuda") if check is None else bool(check(device_type))
    return known


for _kind in ("cpu", "cuda"):  # known before any compiled forward asks
    _has_autocast(_kind)


def no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or nothing on a device without autocast
    (``meta``; torch.autocast raises there).

    >>> with no_autocast("cpu"):
    ...     torch.is_autocast_enabled("cpu")
    False
    """
    if _has_autocast(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on ``x``'s device right now, or None when it is off.

    >>> autocast_dtype(torch.zeros(1)) is None
    True
    """
    kind = x.device.type
    if _has_autocast(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def model_device(model: torch.nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (None without parameters).

    >>> model_device(torch.nn.Linear(1, 1))
    device(type='cpu')
    """
    param = next(model.parameters(), None)
    return None if param is None else param.device


def move_buffers(modules, device: torch.device | None) -> None:
    """Put the buffers registered directly on each of ``modules`` (not their submodules') on
    ``device``, as ``.to(device)`` would.

    >>> m = torch.nn.BatchNorm1d(2); move_buffers([m], torch.device("meta")); m.running_mean.device
    device(type='meta')
    """
    if device is None:
        return
    for mod in modules:
        for key, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device:
                mod._buffers[key] = buf.to(device)
