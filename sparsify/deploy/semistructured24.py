"""N:M 2:4 inference on NVIDIA sparse tensor cores: Linear layers whose weights keep 2 of every 4
input features run on torch's semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``: cuSPARSELt or CUTLASS kernels, CUDA only, compute
capability 8.0 or newer, fp16/bf16/int8 weights). See docs/gpu.md.

``sparsify.finalize(model, semi_structured=True)`` calls :func:`to_semi_structured` on the plain
model it made; the model must already be on a CUDA device in a half dtype.

>>> import torch
>>> ok, why = semi_structured_available(torch.device("cpu"))
>>> ok, why.split(":")[0]
(False, 'semi-structured sparse tensors need a CUDA device')
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.counted import CountedLayer, plain_linear
from sparsify.methods.nm import nm_compliant

__all__ = ["SemiStructuredLinear", "semi_structured_available", "to_semi_structured", "SemiStructuredError"]

_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


class SemiStructuredError(RuntimeError):
    """The model cannot run on semi-structured sparse tensors here; the message says why."""


def semi_structured_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch's semi-structured sparse kernels can run on ``device``, and if not why.

    >>> semi_structured_available(torch.device("cpu"))[0]
    False
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False, (f"semi-structured sparse tensors need a CUDA device: the model is on {device.type} "
                       "(move it with model.to('cuda', torch.bfloat16) first)")
    if not torch.cuda.is_available():
        return False, "semi-structured sparse tensors need a CUDA device: torch sees none"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"semi-structured sparse tensors need compute capability 8.0 or newer (this GPU: {major}.x)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    return True, ""


def _two_four(w: torch.Tensor) -> bool:
    """Every 4 consecutive input features of ``w`` (out, in) hold at most 2 non-zeros."""
    return w.shape[1] % 4 == 0 and nm_compliant(w, 2, 4)


class SemiStructuredLinear(CountedLayer, nn.Module):
    """A Linear whose 2:4 weight is stored compressed (values + metadata) for the sparse tensor
    cores; same outputs as the dense layer up to the kernels' rounding."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.view(*lead, self.out_features)

    def counted_as(self) -> tuple[nn.Linear, None]:
        """The Linear of the decompressed weight (``sparsify.measure`` counts its multiplies)."""
        return plain_linear(self.weight.to_dense(), self.bias), None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured"


def to_semi_structured(model: nn.Module, strict: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` whose weight is 2:4 along its inputs for a
    :class:`SemiStructuredLinear` (in place); the result's ``semi_structured`` attribute maps each
    Linear's name to ``"2:4"`` or the reason it stayed dense. ``strict``: raise instead of keeping
    a layer dense. Raises :class:`SemiStructuredError` where the kernels cannot run at all.

    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> to_semi_structured(m)
    Traceback (most recent call last):
      ...
    sparsify.deploy.semistructured24.SemiStructuredError: semi-structured sparse tensors need a CUDA device: the model is on cpu (move it with model.to('cuda', torch.bfloat16) first)
    """
    param = next(model.parameters(), None)
    ok, why = semi_structured_available(param.device if param is not None else torch.device("cpu"))
    if not ok:
        raise SemiStructuredError(why)
    paths: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        w = mod.weight
        if not name:
            paths[name] = "dense: the model itself is the Linear (wrap it in nn.Sequential)"
        elif w.device.type != "cuda" or w.dtype not in _DTYPES:
            paths[name] = f"dense: weight is {w.dtype} on {w.device.type} (needs fp16/bf16/int8 on CUDA)"
        elif not _two_four(w):
            paths[name] = "dense: weight is not 2:4 along its inputs"
        else:
            try:
                new = SemiStructuredLinear(mod)
            except (RuntimeError, ValueError) as e:  # shape limits of the kernels
                paths[name] = f"dense: {str(e).splitlines()[0]}"
            else:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, new)
                paths[name] = "2:4"
        if strict and paths[name] != "2:4":
            raise SemiStructuredError(f"{name}: {paths[name]}")
    model.semi_structured = paths
    return model
