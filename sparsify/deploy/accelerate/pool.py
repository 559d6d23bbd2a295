"""Faster max pooling for NCHW models: torch's CPU max pool runs about 19x faster on a
channels-last tensor than on an NCHW one (ResNet's stem pool, 1x64x112x112, one thread: 0.32 ms
against 6.1 ms), more than the two layout copies cost. A model whose convs became direct sparse
convs (NCHW) otherwise spends a quarter of its time in that one pool. Two candidates, timed
against the plain pool: :class:`ChannelsLastMaxPool2d` (pools a channels-last copy) and
:class:`DirectMaxPool2d` (the compiled NCHW pool built with the direct conv, no copies).

>>> pool = torch.nn.MaxPool2d(3, 2, 1)
>>> fast = ChannelsLastMaxPool2d.from_pool(pool)
>>> x = torch.randn(1, 8, 20, 20)
>>> bool(torch.equal(fast(x), pool(x))) and fast(x).is_contiguous()
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from passes import set_submodule

from sparsify.deploy.accelerate.extension import direct_available
from sparsify.deploy.accelerate.select import LayerPath, choose

__all__ = ["ChannelsLastMaxPool2d", "DirectMaxPool2d", "channels_last_pool_pass"]


class ChannelsLastMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no indices) that pools a 4-D input in the channels-last layout and hands
    back the layout it was given (the maximum is exact: the same values as the plain pool)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "ChannelsLastMaxPool2d":
        if pool.return_indices:
            raise ValueError("a max pool that returns indices cannot run channels-last here")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        nchw = x.is_contiguous()
        y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), self.kernel_size, self.stride,
                         self.padding, self.dilation, self.ceil_mode)
        return y.contiguous() if nchw else y

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class DirectMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no indices, no dilation, no ceil mode) computed on the NCHW tensor by the
    compiled operator (``max_pool.cpp``); the same values as the plain pool. Falls back to
    ``F.max_pool2d`` where the operator cannot run (not float32 / CPU / 4-D, autograd, no build).

    >>> pool = torch.nn.MaxPool2d(3, 2, 1)
    >>> fast = DirectMaxPool2d.from_pool(pool)
    >>> x = torch.randn(1, 8, 20, 20)
    >>> bool(torch.equal(fast(x), pool(x)))
    True
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.padding = _pair(kernel_size), _pair(padding)
        self.stride = _pair(stride) if stride is not None and stride != [] else self.kernel_size

    @staticmethod
    def supports(pool: nn.MaxPool2d) -> str | None:
        """None when ``pool`` can run as a :class:`DirectMaxPool2d`, else why not."""
        if pool.return_indices:
            return "returns indices"
        if _pair(pool.dilation) != (1, 1) or pool.ceil_mode:
            return "dilation or ceil_mode"
        return None

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "DirectMaxPool2d":
        why = cls.supports(pool)
        if why:
            raise ValueError(f"this max pool cannot run as a DirectMaxPool2d: {why}")
        return cls(pool.kernel_size, pool.stride, pool.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad) or direct_available() is not None):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return torch.ops.sparsify_direct.max_pool2d(x, list(self.kernel_size), list(self.stride), list(self.padding))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@torch.no_grad()
def channels_last_pool_pass(model: nn.Module, shapes: dict, decide: str, margin: float, rows: list) -> None:
    """Time every ``nn.MaxPool2d`` of ``model`` called on a 4-D NCHW input (``shapes``: module name
    -> input shape) against :class:`ChannelsLastMaxPool2d` and, where the compiled operator is
    available, :class:`DirectMaxPool2d`, and swap in the fastest (``decide``, ``margin`` as for
    the other layers); one report row each."""
    for name, m in list(model.named_modules()):
        if type(m) is not nn.MaxPool2d or m.return_indices or len(shapes.get(name, ())) != 4:
            continue
        x = torch.randn(shapes[name])
        options = {}  # the first is what decide="always" takes: the direct pool needs no copies
        if DirectMaxPool2d.supports(m) is None and direct_available() is None:
            options["direct-pool"] = DirectMaxPool2d.from_pool(m)
        options["channels-last"] = ChannelsLastMaxPool2d.from_pool(m)
        cands = {"dense": lambda: m(x), **{k: (lambda f=f: f(x)) for k, f in options.items()}}
        path, times, reason = choose(cands, decide, margin)
        k = (m.kernel_size,) * 2 if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
        rows.append(LayerPath(name, f"MaxPool2d {k[0]}x{k[1]}", path, reason, None, times))
        if path != "dense":
            set_submodule(model, name, options[path])
