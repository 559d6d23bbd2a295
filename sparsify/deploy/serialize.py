"""Compact save/load of finalized models: zeros cost one bit each.

A state dict is stored as plain tensors, lists, strings and dicts only, so
``torch.load(path, weights_only=True)`` reads it. A floating tensor that has zeros is stored as
a bitmask of its non-zeros (``uint8``, 8 entries per byte) plus the non-zero values in order,
whenever that is smaller than the dense tensor (for float32: from about 3% zeros on; at 90%
zeros a weight takes 4.2 bits per entry instead of 32). Everything else is stored as is.
Loading gives back equal tensors (dtype, shape, every value, NaN and inf included) with one
exception: ``-0.0`` comes back as ``0.0``. Pruned weights are often ``-0.0`` (a masked negative
product); keeping the sign would cost a stored value per zero, and no layer output changes.

>>> import torch, tempfile, os
>>> lin = torch.nn.Linear(64, 64)
>>> with torch.no_grad(): lin.weight[:, 8:] = 0
>>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> n_bytes = save(lin, path)
>>> sd = load(path)
>>> bool(torch.equal(sd["weight"], lin.weight)) and list(sd) == ["weight", "bias"]
True
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["FORMAT", "compact_state_dict", "expand_state_dict", "save", "load", "saved_size"]

FORMAT = "fx-sparsify-compact/1"
_BIT = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) * _BIT).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1) & _BIT) != 0
    return bits.reshape(-1)[:numel]


def _compact_bytes(t: torch.Tensor, nnz: int) -> int:
    return (t.numel() + 7) // 8 + nnz * t.element_size()


def compact_state_dict(state_dict: dict) -> dict:
    """The storable form of ``state_dict`` (see the module docstring); tensors are moved to CPU.

    >>> sd = compact_state_dict({"w": torch.zeros(100)})
    >>> sd["sparse"]["w"]["values"].numel()
    0
    """
    dense, sparse = {}, {}
    for key, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided and t.numel():
            t = t.detach().cpu().contiguous()
            nz = t != 0  # NaN counts as a value; -0.0 is stored as 0.0
            nnz = int(nz.sum())
            if _compact_bytes(t, nnz) < t.numel() * t.element_size():
                sparse[key] = {"shape": list(t.shape), "bitmask": _pack_bits(nz), "values": t.reshape(-1)[nz.reshape(-1)].clone()}
                continue
        dense[key] = t.detach().cpu() if isinstance(t, torch.Tensor) else t
    return {"format": FORMAT, "order": list(state_dict), "dense": dense, "sparse": sparse}


def expand_state_dict(stored: dict) -> "OrderedDict[str, torch.Tensor]":
    """The plain state dict back from :func:`compact_state_dict`'s output.

    >>> sd = {"w": torch.tensor([0.0, 2.0, 0.0, -1.0])}
    >>> expand_state_dict(compact_state_dict(sd))["w"].tolist()
    [0.0, 2.0, 0.0, -1.0]
    """
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (saved by sparsify.deploy.serialize.save); for a plain state dict "
                         "use torch.load directly")
    out = OrderedDict()
    for key in stored["order"]:
        if key in stored["dense"]:
            out[key] = stored["dense"][key]
            continue
        entry = stored["sparse"][key]
        values = entry["values"]
        numel = 1
        for d in entry["shape"]:
            numel *= int(d)
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[_unpack_bits(entry["bitmask"], numel)] = values
        out[key] = flat.reshape(entry["shape"])
    return out


def save(model_or_state_dict, path: str | os.PathLike | io.BufferedIOBase) -> int:
    """Save ``model.state_dict()`` (or a state dict) compactly with ``torch.save``; returns the
    number of bytes written when ``path`` is a file name (else 0)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    torch.save(compact_state_dict(sd), path)
    return os.path.getsize(path) if isinstance(path, (str, os.PathLike)) else 0


def load(path, map_location=None) -> "OrderedDict[str, torch.Tensor]":
    """Read a file written by :func:`save` with ``torch.load(weights_only=True)``; returns a plain
    state dict for ``model.load_state_dict``."""
    return expand_state_dict(torch.load(path, map_location=map_location, weights_only=True))


def saved_size(model_or_state_dict, compact: bool = True) -> int:
    """Bytes ``torch.save`` writes for the state dict, compact (:func:`save`) or plain.

    >>> saved_size(torch.nn.Linear(256, 256), compact=False) > 256 * 256 * 4
    True
    """
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    buf = io.BytesIO()
    torch.save(compact_state_dict(sd) if compact else sd, buf)
    return buf.tell()
