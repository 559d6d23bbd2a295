"""Direct sparse convolution for weight-sparse Conv2d layers on CPU (k x k, strided, dilated,
grouped, 1x1), float32, NCHW.

Each non-zero weight ``w[o, c, ky, kx]`` adds ``w`` times a shifted, strided input plane into
output plane ``o`` (Park et al., ICLR 2017, "Faster CNNs with direct sparse convolutions"), so
the work is proportional to the non-zeros. The kernel is C++ (``direct_conv.cpp`` beside this
file), built on first use with ``torch.utils.cpp_extension.load`` (``-O3 -march=native``; cached
under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Where it cannot be built
(no compiler), one warning says so, the path is not offered, and a :class:`DirectSparseConv2d`
loaded from a file computes with the dense weight (``F.conv2d``) instead. Set
``SPARSIFY_DIRECT_CONV=0`` to never build it. See docs/deployment.md.

>>> import torch
>>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
>>> with torch.no_grad(): _ = conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
>>> fast = DirectSparseConv2d.from_conv(conv)
>>> x = torch.randn(2, 4, 9, 9)
>>> bool(torch.allclose(fast(x), conv(x), atol=1e-5))
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.deploy.accelerate.extension import EXTENSION_NAME, direct_available
from sparsify.core.counted import CountedLayer, plain_conv2d
from sparsify.core.subclasses import own_forward_reason

__all__ = ["DirectSparseConv2d", "supports_direct", "direct_available", "EXTENSION_NAME"]

# Input bytes one channel block may span under a 64-output tile, so the block's rows stay in
# cache while every output channel adds its taps from them. Set by measurement (ResNet 3x3 and
# 1x1 layers, 1 thread, this machine's 32 KB L1 / 1 MB L2): 64 KB beat 16 KB, 32 KB and no blocks.
L1_BUDGET = 64 * 1024


def supports_direct(conv: nn.Module) -> str | None:
    """None when ``conv`` can become a :class:`DirectSparseConv2d`, else why not.

    >>> supports_direct(torch.nn.Conv2d(4, 4, 3, padding="same"))
    "padding='same' (numeric padding only)"
    """
    if not isinstance(conv, nn.Conv2d):
        return "not a Conv2d"
    if own := own_forward_reason(conv, nn.Conv2d):  # timm's Conv2dSame pads at run time
        return own
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (numeric padding only)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (zero padding only)"
    if conv.weight.dtype != torch.float32:
        return f"{conv.weight.dtype} weight (float32 only)"
    return None


class DirectSparseConv2d(CountedLayer, nn.Module):
    """A Conv2d holding only its non-zero weights: per output channel (CSR-like ``rowptr``) the
    taps ``(input channel, ky, kx)`` and their values, built once from the dense weight.

    Buffers (all in the ``state_dict``): ``rowptr`` (int32, out + 1), ``taps`` (int32, nnz x 3),
    ``values`` (float32, nnz), ``bias`` (or None). The per-input-size plan (tap offsets in the
    padded, phase-split input) is derived on first use and not saved. ``relu`` applies a ReLU to
    the output in the same pass; ``forward(x, residual)`` adds a residual connection before it.

    Block-structured weights: aligned groups of 4 (else 2) consecutive output channels whose taps
    sit at the same positions (magnitude pruning with ``block=[4, 1]``) are found from the taps
    and computed together, each input vector loaded once for the group (:meth:`block_groups`;
    ``use_blocks = False`` turns it off). Other channels run one by one, the results are the same.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = False):
        super().__init__()
        pair = (lambda v: tuple(int(t) for t in v) if isinstance(v, (tuple, list)) else (int(v), int(v)))
        w = weight.detach().float()
        self.out_channels, cin_g, kh, kw = w.shape
        self.in_channels, self.groups = cin_g * groups, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (kh, kw), pair(stride), pair(padding), pair(dilation)
        self.relu = relu
        nz = w.nonzero()  # (o, c in group, ky, kx), sorted by o
        o = nz[:, 0]
        c = (o // (self.out_channels // groups)) * cin_g + nz[:, 1]
        self.register_buffer("taps", torch.stack([c, nz[:, 2], nz[:, 3]], 1).to(torch.int32))
        self.register_buffer("values", w[nz.unbind(1)].clone())
        counts = torch.bincount(o, minlength=self.out_channels)
        self.register_buffer("rowptr", torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._plan = None  # ((H, W, taps, taps version), offsets, blocks, geometry)
        self._dense = None  # (key, dense weight) for the fallback, built on demand
        self._groups = None  # (taps key, block groups or None)
        self.use_blocks = True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool = False) -> "DirectSparseConv2d":
        why = supports_direct(conv)
        if why:
            raise ValueError(f"cannot run this conv as a direct sparse conv: {why}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, relu)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan"], state["_dense"], state["_groups"] = None, None, None
        return state

    def nnz(self) -> int:
        return self.values.numel()

    def block_groups(self) -> torch.Tensor | None:
        """Per output channel (int32): 4 or 2 where an aligned group of that many consecutive
        channels with identical taps (input channel, ky, kx) starts, 0 inside such a group, 1 for a
        channel computed on its own; None when no group has a tap (or ``use_blocks`` is off).

        >>> w = torch.zeros(6, 2, 3, 3); w[:4, 0, 1, 1] = 1.0; w[4, 1, 0, 0] = 2.0
        >>> DirectSparseConv2d(w, None).block_groups().tolist()
        [4, 0, 0, 0, 1, 1]
        """
        if not self.use_blocks:
            return None
        taps, rowptr, cached = self.taps, self.rowptr, self._groups  # per forward: identity tests only
        if cached is not None and cached[0][0] is taps and cached[0][1] == taps._version \
                and cached[0][2] is rowptr and cached[0][3] == rowptr._version:
            return cached[1]
        self._groups = ((taps, taps._version, rowptr, rowptr._version), _find_groups(rowptr.long(), taps))
        return self._groups[1]

    def block_size(self) -> int:
        """The largest output-channel group the kernel runs together (1: none).

        >>> w = torch.zeros(4, 1, 3, 3); w[:, 0, 1] = 1.0
        >>> DirectSparseConv2d(w, None).block_size()
        4
        """
        g = self.block_groups()
        return 1 if g is None else int(g.max())

    def blocked_fraction(self) -> float:
        """The share of the taps that run in block groups (0.0 without groups).

        >>> w = torch.zeros(6, 1, 3, 3); w[:4, 0, 1] = 1.0; w[4, 0, 0, 0] = 1.0
        >>> DirectSparseConv2d(w, None).blocked_fraction()
        0.9230769230769231
        """
        g = self.block_groups()
        if g is None or not self.nnz():
            return 0.0
        counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
        start = torch.cummax(torch.where(g != 0, torch.arange(g.numel()), 0), 0).values  # each channel's group
        member = g.long()[start] > 1
        return float(counts[member].sum()) / self.nnz()

    def dense_weight(self) -> torch.Tensor:
        """The (out, in / groups, kh, kw) weight these taps came from."""
        # in the values' dtype and device: a model cast with .half() / moved computes densely from it
        w = torch.zeros(self.out_channels, self.in_channels // self.groups, *self.kernel_size,
                        dtype=self.values.dtype, device=self.values.device)
        if self.nnz():
            o = torch.repeat_interleave(torch.arange(self.out_channels, device=self.rowptr.device),
                                        (self.rowptr[1:] - self.rowptr[:-1]).long())
            c, ky, kx = self.taps.long().unbind(1)
            w[o, c - (o // (self.out_channels // self.groups)) * w.shape[1], ky, kx] = self.values
        return w

    def counted_as(self) -> tuple[nn.Conv2d, None]:
        """The conv these taps compute (``sparsify.measure`` counts its multiplies)."""
        return plain_conv2d(self.dense_weight(), self.bias, self.stride, self.padding, self.dilation,
                            self.groups), None

    def plan(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Tap offsets into one image of the padded, phase-split input, the (out, blocks + 1)
        first tap of each output channel per input channel block, and the geometry list the
        operator takes, for an ``h`` x ``w`` input (cached for the last size)."""
        plan, taps = self._plan, self.taps  # asked on every forward: no tensor comparisons
        if plan is not None and plan[0][:2] == (h, w) and plan[0][2] is taps and plan[0][3] == taps._version:
            return plan[1], plan[2], plan[3]
        key = (h, w, taps, taps._version)  # the tensor itself (not its id): a new one never matches
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"a {h}x{w} input is smaller than this conv's (dilated) {kh}x{kw} kernel")
        c, ky, kx = self.taps.long().unbind(1)
        oy, ox = ky * dh, kx * dw
        phase = (oy % sh) * sw + ox % sw  # which stride phase each tap reads
        used = torch.unique(phase) if phase.numel() else torch.zeros(1, dtype=torch.long)
        hq, wq = ho + (kh - 1) * dh // sh, wo + (kw - 1) * dw // sw
        if self.in_channels * used.numel() * hq * wq >= 2 ** 31:
            raise ValueError(f"a {h}x{w} input is too large for int32 tap offsets")
        off = ((c * used.numel() + torch.searchsorted(used, phase)) * hq + oy // sh) * wq + ox // sw
        phases = [int(v) for u in used.tolist() for v in (u // sw, u % sw)]
        geometry = [self.out_channels, ho, wo, hq, wq, sh, sw, ph, pw, *phases]
        # input channel blocks: the first tap of every output channel in each block (taps are
        # sorted by output, then input channel), the block sized by L1_BUDGET
        row_bytes = 4 * (64 + 16 + (kw - 1) * dw // sw)
        cb = max(1, L1_BUDGET // (kh * min(sw, kw) * row_bytes))
        nb = -(-self.in_channels // cb)
        o = torch.repeat_interleave(torch.arange(self.out_channels), (self.rowptr[1:] - self.rowptr[:-1]).long())
        span = self.in_channels + 1
        starts = (torch.arange(nb + 1) * cb).clamp(max=self.in_channels)
        queries = torch.arange(self.out_channels).unsqueeze(1) * span + starts
        blocks = torch.searchsorted(o * span + c, queries.flatten()).reshape(self.out_channels, nb + 1)
        self._plan = (key, off.to(torch.int32), blocks.to(torch.int32), geometry)
        return self._plan[1], self._plan[2], geometry

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(x)``, or with ``residual`` (a tensor of the output's shape) ``conv(x) + residual``,
        then the ReLU if ``relu``: a residual connection's add in the conv's own pass."""
        if (x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] != self.in_channels
                or (torch.is_grad_enabled() and x.requires_grad) or direct_available() is not None):
            return self._dense_forward(x, residual)
        off, blocks, geometry = self.plan(x.shape[2], x.shape[3])
        if residual is not None and not self._fusable(residual, x.shape[0], geometry):
            y = torch.ops.sparsify_direct.conv2d(x, off, blocks, self.values, self.bias, geometry, False, None,
                                                 self.block_groups())
            return self._epilogue(y, residual)
        return torch.ops.sparsify_direct.conv2d(x, off, blocks, self.values, self.bias, geometry, self.relu,
                                                residual, self.block_groups())

    def _fusable(self, residual: torch.Tensor, n: int, geometry: list[int]) -> bool:
        """Whether the kernel can add ``residual`` itself (else the add runs in torch, broadcast
        and type promotion included)."""
        return (residual.dtype == torch.float32 and residual.device.type == "cpu"
                and not (torch.is_grad_enabled() and residual.requires_grad)
                and tuple(residual.shape) == (n, self.out_channels, geometry[1], geometry[2]))

    def _epilogue(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def thread_split(self, shape, threads: int, spatial_groups: int = -1) -> torch.Tensor:
        """How the kernel splits an input of ``shape`` (N, C, H, W) over ``threads`` threads: one
        int64 row per thread: first unit, end unit, first out channel, end out channel, work,
        computed work. A unit is one image's tile of 64 output positions (in rows of the padded
        width), work = taps x output positions, computed work = taps x the positions of the vectors
        computed (a partial last vector costs a whole one). ``spatial_groups``: force that many unit groups (-1: the kernel's
        choice). Needs the compiled operator.

        >>> conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        >>> split = DirectSparseConv2d.from_conv(conv).thread_split((1, 8, 32, 32), 2)
        >>> split.shape, int(split[:, 4].sum()) == 8 * 8 * 9 * 32 * 34
        (torch.Size([2, 6]), True)
        """
        _, blocks, geometry = self.plan(int(shape[2]), int(shape[3]))
        return torch.ops.sparsify_direct.partition(blocks, list(shape), geometry, threads, spatial_groups,
                                                   self.block_groups())

    def _dense_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        key = tuple((t.data_ptr(), t._version) for t in (self.taps, self.values, self.rowptr)) + (x.dtype,)
        if self._dense is None or self._dense[0] != key:  # rebuilt after load_state_dict
            self._dense = (key, self.dense_weight().to(x.dtype))
        y = F.conv2d(x, self._dense[1], None if self.bias is None else self.bias.to(x.dtype), self.stride,
                     self.padding, self.dilation, self.groups)
        return self._epilogue(y, residual)

    def extra_repr(self) -> str:
        total = self.out_channels * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
                + (", relu=True" if self.relu else "") + f", stored density={self.nnz() / max(total, 1):.3f}"
                + (f", blocks of {self.block_size()} channels" if self.block_size() > 1 else ""))


def _find_groups(rowptr: torch.Tensor, taps: torch.Tensor) -> torch.Tensor | None:
    """:meth:`DirectSparseConv2d.block_groups` from the CSR rows: groups of 4 first, then pairs
    among the channels left (both aligned to their size)."""
    cout = rowptr.numel() - 1
    counts = rowptr[1:] - rowptr[:-1]
    o = torch.repeat_interleave(torch.arange(cout), counts)
    taps = taps[:o.numel()]
    groups = torch.ones(cout, dtype=torch.int32)
    for bo in (4, 2):
        ng = cout // bo
        if ng == 0:
            continue
        free = (groups[:ng * bo] == 1).view(ng, bo).all(1)
        c = counts[:ng * bo].view(ng, bo)
        ok = free & (c == c[:, :1]).all(1) & (c[:, 0] > 0)
        inside = o < ng * bo  # taps of channels that could be in a group
        first = (o[inside] // bo) * bo
        pos = torch.arange(o.numel())[inside] - rowptr[o[inside]]
        ref = (rowptr[first] + pos).clamp(max=max(o.numel() - 1, 0))  # equal counts: the first channel's tap
        differ = (taps[inside] != taps[ref]).any(1)
        ok &= torch.zeros(ng, dtype=torch.long).index_add_(0, o[inside] // bo, differ.long()) == 0
        starts = torch.nonzero(ok).flatten() * bo
        if starts.numel():
            groups[(starts.unsqueeze(1) + torch.arange(bo)).flatten()] = 0
            groups[starts] = bo
    return groups if bool((groups > 1).any()) else None
