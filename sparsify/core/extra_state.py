"""Module extra state as one uint8 tensor, so that every ``state_dict`` entry is a tensor.

``nn.Module.get_extra_state`` may return any object, but safetensors (what Hugging Face's
``save_pretrained`` and ``Trainer`` checkpoints, and accelerate's ``save_state``, write) stores
tensors only: a dict there stops the save with ``'dict' object has no attribute 'device'``. The
library's extra states (the recipe and ``total_steps``, a group's held layers, a regularizer's
active flag, a generator state) are small plain data; :func:`pack` writes them as the UTF-8 bytes
of their JSON in a uint8 tensor and :func:`unpack` reads that back, or the dict a checkpoint saved
before this format holds.

The tensor keeps one size over a run (``pack(state, like=...)`` pads the JSON with spaces to the
size of the largest state the module can hold): EMA tools copy every ``state_dict`` entry into
the averaged model's in place (timm's ``ModelEmaV2`` / ``ModelEmaV3``), which fails on a tensor
whose size changed since the copy was made (see docs/averaging.md).
"""
from __future__ import annotations

import base64
import json

import torch

__all__ = ["pack", "unpack", "WIDEST_FLOAT"]

_BYTES = "__uint8_base64__"
# the longest JSON a Python float takes (24 characters), for ``like``
WIDEST_FLOAT = -2.2250738585072014e-308


def _encode(value):
    if isinstance(value, torch.Tensor):  # e.g. a torch.Generator state (a uint8 tensor)
        return {_BYTES: base64.b64encode(bytes(value.detach().cpu().to(torch.uint8).tolist())).decode("ascii")}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {_BYTES}:
            return torch.frombuffer(bytearray(base64.b64decode(value[_BYTES])), dtype=torch.uint8).clone()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _dumps(state: dict) -> bytes:
    return json.dumps(_encode(state), sort_keys=True).encode("utf-8")


def pack(state: dict, like: dict | None = None) -> torch.Tensor:
    """``state`` (JSON data; uint8 tensors allowed as values) as a 1-D uint8 tensor, padded to the
    size ``like`` (the largest state of the same form) packs to, so that its size does not change
    while the values do.

    >>> t = pack({"active": True, "held": ["conv1"]})
    >>> t.dtype, unpack(t)
    (torch.uint8, {'active': True, 'held': ['conv1']})
    >>> len(pack({"active": True}, like={"active": False})) == len(pack({"active": False}))
    True
    >>> unpack({"active": False})  # a checkpoint written before the tensor format
    {'active': False}
    """
    raw = _dumps(state)
    if like is not None:
        width = len(_dumps(like))
        if len(raw) > width:
            raise ValueError(f"extra state {raw[:80]!r} is larger than the {width} bytes its 'like' packs to")
        raw += b" " * (width - len(raw))  # JSON ignores trailing white space
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def unpack(state) -> dict:
    """The dict :func:`pack` wrote (or the dict itself, from an older checkpoint)."""
    if isinstance(state, torch.Tensor):
        return _decode(json.loads(bytes(state.detach().cpu().to(torch.uint8).tolist()).decode("utf-8")))
    return dict(state)
