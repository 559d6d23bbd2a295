"""Patch-skipping convolution: a Conv2d (BN folded in) that computes only the kept output positions.

Semi-structured activation sparsity (docs/methods/semistructured.md) masks whole output positions (h, w), the same
for every channel and sample: whole im2col columns. Here those columns are never computed:

1. the input is padded once, in channels-last order (N, Hp, Wp, C);
2. for stride-1-in-width kernels of dilation 1, the kw input pixels of one kernel row are
   contiguous in that order, so each kept position needs kh chunks of kw*C floats; a precomputed
   index (kept positions x kernel rows) gathers them straight from the padded input into a
   (N*P, kh*kw*C) matrix (P kept positions; the full im2col is never built);
3. one GEMM with the (Cout, kh*kw*C) weight (oneDNN, packed once; see ``gemm.py``);
4. the rows are scattered into an output pre-filled with what the masked layer holds at skipped
   positions: the mask multiplies ``conv(x) + b``, so that is ``BN(0)``, the BN-folded bias of a
   bias-free conv (``β − γμ/sqrt(σ²+ε)``), or 0 without BN.

The output is a channels-last tensor (an NCHW-shaped view of NHWC memory), which torch's other
CPU operators take as is.

>>> import torch
>>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)
>>> keep = torch.ones(8, 8, dtype=torch.bool); keep[0] = False
>>> fast = PatchSkipConv2d.from_conv(conv, keep)
>>> x = torch.randn(1, 3, 8, 8)
>>> ref = conv(x) * keep
>>> bool(torch.allclose(fast(x), ref, atol=1e-5))
True
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify.deploy.accelerate.gemm import PackCache, gemm
from sparsify.core.counted import CountedLayer, plain_conv2d
from sparsify.core.subclasses import own_forward_reason

__all__ = ["PatchSkipConv2d", "fold_bn", "supports_patch_skip", "CHUNK_BYTES"]

# The gathered patch matrix is kh*kw times the input: at batch 8 an early ResNet layer's is ~40 MB,
# past the last-level cache, and the gather then costs a third of the GEMM (measured). Larger
# blocks are split into row blocks of about this size, one GEMM each (set by benchmark; see
# docs/deployment.md).
CHUNK_BYTES: int | None = 4 * 2 ** 20


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def supports_patch_skip(conv: nn.Module) -> str | None:
    """None when ``conv`` can become a :class:`PatchSkipConv2d`, else why not.

    >>> supports_patch_skip(torch.nn.Conv2d(4, 4, 3, groups=4))
    'grouped/depthwise conv (no single GEMM)'
    """
    if not isinstance(conv, nn.Conv2d):
        return "not a Conv2d"
    if own := own_forward_reason(conv, nn.Conv2d):  # timm's Conv2dSame pads at run time
        return own
    if conv.groups != 1:
        return "grouped/depthwise conv (no single GEMM)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (numeric padding only)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (zero padding only)"
    return None


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm that follows the conv folded in.

    >>> bn = torch.nn.BatchNorm2d(2).eval()
    >>> w, b = fold_bn(torch.ones(2, 1, 1, 1), None, bn)
    >>> [round(v, 4) for v in w.flatten().tolist()], b.tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w, (b - bn.running_mean) * scale + shift


class PatchSkipConv2d(CountedLayer, nn.Module):
    """Conv2d over a fixed input size computing only the output positions where ``keep`` is True;
    skipped positions hold ``skip_value`` (per channel; default 0). See the module docstring.

    ``weight`` and ``bias`` (kept positions) have any BatchNorm already folded in (:func:`fold_bn`);
    ``keep`` is a bool (Ho, Wo) tensor; ``input_hw`` the (H, W) the layer is built for (other
    input sizes raise a ``ValueError``: the mask belongs to one resolution).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor,
                 input_hw: tuple[int, int] | None = None, stride=1, padding=0, dilation=1,
                 skip_value: torch.Tensor | None = None):
        super().__init__()
        cout, cin, kh, kw = weight.shape
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.in_channels, self.out_channels, self.kernel_size = cin, cout, (kh, kw)
        keep = keep.bool()
        ho, wo = keep.shape
        if input_hw is None:  # the smallest input giving that output (any larger one is ambiguous)
            input_hw = tuple((o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in
                             zip((ho, wo), self.stride, self.padding, self.dilation, (kh, kw)))
        self.input_hw = tuple(int(v) for v in input_hw)
        expect = tuple((i + 2 * p - d * (k - 1) - 1) // s + 1 for i, s, p, d, k in
                       zip(self.input_hw, self.stride, self.padding, self.dilation, (kh, kw)))
        if expect != (ho, wo):
            raise ValueError(f"keep mask is {ho}x{wo} but a {self.input_hw} input gives a {expect} output")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter((bias if bias is not None else torch.zeros(cout, dtype=weight.dtype,
                                                                            device=weight.device)).detach().clone(),
                                 requires_grad=False)
        self.register_buffer("keep", keep.clone())
        self.register_buffer("skip_value", torch.zeros_like(self.bias) if skip_value is None
                             else skip_value.detach().clone().to(self.bias))
        hp, wp = self.input_hw[0] + 2 * self.padding[0], self.input_hw[1] + 2 * self.padding[1]
        self._padded_hw = (hp, wp)
        # dilation 1 in width: one chunk of kw*C floats per kernel row; else one pixel per tap
        self._taps_per_chunk = kw if self.dilation[1] == 1 else 1
        pos = keep.flatten().nonzero().flatten()
        oh, ow = pos // wo, pos % wo
        start = (oh * self.stride[0]) * wp + ow * self.stride[1]  # top-left input pixel, per kept position
        if self._taps_per_chunk == kw:
            taps = torch.arange(kh) * self.dilation[0] * wp
        else:
            taps = (torch.arange(kh)[:, None] * self.dilation[0] * wp + torch.arange(kw)[None, :] * self.dilation[1]).flatten()
        self.register_buffer("gather_index", (start[:, None] + taps[None, :]).flatten(), persistent=False)
        self.register_buffer("kept_positions", pos, persistent=False)
        self.relu = False  # set when a following ReLU is fused in (see ``convert.py``)
        # gather at most this many bytes of patches per GEMM (None: all at once); see CHUNK_BYTES
        self.chunk_bytes: int | None = CHUNK_BYTES
        self._pack = PackCache()
        self._batch_cache: dict = {}
        self._gemm_weight = (None, None)

    def counted_as(self) -> tuple[nn.Conv2d, torch.Tensor]:
        """The conv this layer computes and the output positions it computes it at
        (``sparsify.measure`` counts its multiplies there only)."""
        return plain_conv2d(self.weight, self.bias, self.stride, self.padding, self.dilation), self.keep

    def gemm_weight(self) -> torch.Tensor:
        """The weight in the gathered column order (kernel row, kernel column, input channel),
        re-derived whenever ``weight`` changes (e.g. ``load_state_dict``)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._gemm_weight[0] != key:
            self._gemm_weight = (key, self.weight.detach().permute(0, 2, 3, 1).reshape(self.out_channels, -1)
                                 .contiguous())
        return self._gemm_weight[1]

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, keep: torch.Tensor, bn: nn.Module | None = None,
                  input_hw: tuple[int, int] | None = None) -> "PatchSkipConv2d":
        """Build from a plain ``conv`` (and the eval-mode ``bn`` after it, folded in)."""
        why = supports_patch_skip(conv)
        if why:
            raise ValueError(f"cannot skip patches of this conv: {why}")
        w, b, skip = conv.weight, conv.bias, None
        if bn is not None:
            w, b = fold_bn(w, b, bn)
            skip = fold_bn(conv.weight[:, :1, :1, :1], None, bn)[1]  # BN(0): the mask zeroed conv(x) + b
        return cls(w, b, keep, input_hw, conv.stride, conv.padding, conv.dilation, skip)

    def _batch_state(self, n: int, x: torch.Tensor) -> dict:
        """Indices and reusable work buffers for a batch of ``n`` (cached for one batch size).

        Reusing the padded input and the gather buffer matters at batch 8: a fresh 7 MB tensor
        costs ~2 ms of page faults per call on a 56² layer (measured), a quarter of the GEMM.
        """
        key = (n, x.device, x.dtype)
        st = self._batch_cache.get(key)
        if st is None:
            dev = x.device
            hp, wp = self._padded_hw
            ho, wo = self.keep.shape
            g = self.gather_index.to(dev)
            s = self.kept_positions.to(dev)
            skipped = (~self.keep.flatten()).nonzero().flatten().to(dev)
            if n > 1:
                g = (g[None, :] + (torch.arange(n, device=dev) * hp * wp)[:, None]).flatten()
                s = (s[None, :] + (torch.arange(n, device=dev) * ho * wo)[:, None]).flatten()
                skipped = (skipped[None, :] + (torch.arange(n, device=dev) * ho * wo)[:, None]).flatten()
            c = self.in_channels
            k = self.kernel_size[0] * self.kernel_size[1] * c
            step = s.numel() if not self.chunk_bytes else max(64, self.chunk_bytes // (k * x.element_size()))
            step = max(1, min(step, s.numel()))
            st = {"gather": g, "scatter": s, "skipped": skipped, "step": step,
                  # borders stay zero: only the interior is written on each call
                  "padded": x.new_zeros(n, hp, wp, c) if any(self.padding) else None,
                  "cols": x.new_empty(step * (g.numel() // max(1, s.numel())), self._taps_per_chunk * c)}
            self._batch_cache = {key: st}  # one batch size at a time keeps memory bounded
        return st

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (h, w) != self.input_hw:
            raise ValueError(f"PatchSkipConv2d was built for {self.input_hw[0]}x{self.input_hw[1]} inputs "
                             f"(its position mask belongs to that resolution), got {h}x{w}")
        st = self._batch_state(n, x)
        ph, pw = self.padding
        ho, wo = self.keep.shape
        xp = st["padded"]
        if xp is not None:
            xp[:, ph:ph + h, pw:pw + w].copy_(x.permute(0, 2, 3, 1))
        else:  # no padding: gather straight from a channels-last input, else from one NHWC copy
            xp = x.permute(0, 2, 3, 1)
            if not xp.is_contiguous():
                xp = xp.contiguous()
        flat = xp.reshape(-1)
        chunk = self._taps_per_chunk * c
        # row r of this overlapping view = `chunk` floats starting at pixel r (no copy)
        rows = flat.as_strided((flat.numel() // c - self._taps_per_chunk + 1, chunk), (c, 1))
        gidx, sidx, step, cols_buf = st["gather"], st["scatter"], st["step"], st["cols"]
        out = x.new_empty(n * ho * wo, self.out_channels)
        skip = self.skip_value.to(x.dtype)
        skip = skip.clamp_min(0) if self.relu else skip
        # skipped rows hold the skip value; each output row is written exactly once
        out.index_copy_(0, st["skipped"], skip.expand(st["skipped"].numel(), self.out_channels))
        k = self.kernel_size[0] * self.kernel_size[1] * c
        taps = gidx.numel() // max(1, sidx.numel())  # gathered chunks per output row
        weight = self.gemm_weight()
        for r0 in range(0, sidx.numel(), step):  # one GEMM unless the gathered block outgrows the cache
            g = gidx[r0 * taps:(r0 + step) * taps]
            cols = torch.index_select(rows, 0, g, out=cols_buf[:g.numel()]).view(-1, k)
            out.index_copy_(0, sidx[r0:r0 + step], gemm(cols, weight, self.bias, self._pack, relu=self.relu))
        return out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        kept = int(self.keep.sum())
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, input={self.input_hw}, kept={kept}/{self.keep.numel()} positions"
                + (", relu" if self.relu else ""))
