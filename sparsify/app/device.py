"""Where ``sparsify train`` runs: ``--device`` (``auto``: the GPU when torch sees one, else the
CPU) and ``--amp bf16`` (forward and loss under ``torch.autocast`` in bfloat16; the weights,
optimizer and sparsify's thresholds and masks stay float32: docs/gpu.md).

Batches are made on the CPU (:mod:`sparsify.app.batches`) and moved here, one at a time.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from sparsify.app.settings import AMP_CHOICES

__all__ = ["resolve_device", "on_device", "autocast", "AMP_CHOICES"]


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device name`` asks for; a one-line ``ValueError`` for one torch cannot use.

    >>> resolve_device("cpu"), resolve_device(None).type in ("cpu", "cuda")
    (device(type='cpu'), True)
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ValueError: --device gpu: not a device torch knows (cpu, cuda, cuda:1, mps, ... or auto)
    """
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, mps, ... or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA device (torch.cuda.is_available() is False, "
                             f"torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: this torch has no usable MPS device; use --device cpu")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"--device {name}: this torch has no usable XPU device; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: sparsify train runs on cpu, cuda, mps or xpu")
    return device


def on_device(batches: Iterable, device: torch.device) -> Iterator:
    """``(x, y)`` batches moved to ``device`` (left as they are on the CPU)."""
    if device.type == "cpu":
        yield from batches
        return
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def autocast(device: torch.device, amp: str | None):
    """The forward's context: bfloat16 autocast for ``amp == "bf16"``, else none."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp {amp}: one of {', '.join(AMP_CHOICES)}")
    return torch.autocast(device.type, dtype=torch.bfloat16)
