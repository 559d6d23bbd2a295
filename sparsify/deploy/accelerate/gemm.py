"""One dense GEMM ``y = x @ W.T + b`` through oneDNN with a pre-packed weight, when available.

Why: on CPU ``F.linear`` in float32 goes to MKL's sgemm, which for the skinny shapes of a conv's
im2col (64-512 output channels) runs at about half the speed of oneDNN, the engine torch's own
dense convolutions use (measured: 95 vs 225 GMAC/s on 2 AVX-512 cores). A patch-skipping conv
built on sgemm would lose against the dense conv whatever it skips. The packed weight is an
opaque oneDNN tensor: derived from the plain weight on first use, never saved, never copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PackCache", "gemm", "onednn_available"]


def onednn_available() -> bool:
    """Whether torch was built with oneDNN and exposes the packed-linear operators.

    >>> isinstance(onednn_available(), bool)
    True
    """
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackCache:
    """Holds a packed weight for one module; empty again after a copy or a pickle round-trip."""

    def __init__(self):
        self.key = None
        self.packed = None

    def __getstate__(self):
        return {"key": None, "packed": None}

    def __deepcopy__(self, memo):
        return PackCache()


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache: PackCache,
         use_onednn: bool = True, relu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x``; oneDNN with a weight packed once (kept in
    ``cache``, re-packed if the weight changes) for float32 on CPU without autograd, else
    ``F.linear``. ``relu`` applies a ReLU to the result (fused into the oneDNN GEMM).

    >>> gemm(torch.ones(2, 3), torch.eye(3), torch.zeros(3), PackCache()).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if (use_onednn and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and onednn_available()):
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if cache.key != key:
            cache.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            cache.key = key
        return torch.ops.mkldnn._linear_pointwise(x, cache.packed, bias, "relu" if relu else "none", [], "")
    y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y
