"""Layers that multiply a weight with kernels of their own (the accelerated layers ``finalize``
makes: a direct sparse conv, a CSR matmul, a patch-skipping conv, a 2:4 tensor-core Linear), and
how their multiplies are counted: each says which plain torch layer it computes
(:meth:`CountedLayer.counted_as`), and ``sparsify.measure`` counts that layer on the inputs the
accelerated one receives, so a model's MACs are the same before and after ``finalize``."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CountedLayer", "plain_conv2d", "plain_linear"]


class CountedLayer:
    """Mixin of an ``nn.Module`` that computes a plain Conv/Linear by a kernel of its own.

    >>> class Scaled(CountedLayer, nn.Module):
    ...     def counted_as(self):
    ...         return plain_linear(torch.eye(2), None), None
    >>> type(Scaled().counted_as()[0]).__name__
    'Linear'
    """

    def counted_as(self) -> tuple[nn.Module, torch.Tensor | None]:
        """The plain layer this one computes (holding its weight, zeros included: its non-zeros
        are the multiplies it makes), and the bool (H, W) output positions it computes, or None
        for all of them."""
        raise NotImplementedError(f"{type(self).__name__} does not say which plain layer it computes")


def plain_conv2d(weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0, dilation=1,
                 groups: int = 1) -> nn.Conv2d:
    """An eval-mode ``nn.Conv2d`` holding ``weight`` (out, in / groups, kh, kw), without the
    initialisation a constructed layer spends on weights it overwrites.

    >>> plain_conv2d(torch.zeros(4, 2, 3, 3), None, padding=1, groups=2)
    Conv2d(4, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2, bias=False)
    """
    conv = nn.utils.skip_init(nn.Conv2d, weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                              stride=stride, padding=padding, dilation=dilation, groups=groups,
                              bias=bias is not None, device=weight.device, dtype=weight.dtype)
    return _hold(conv, weight, bias)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An eval-mode ``nn.Linear`` holding ``weight`` (out, in).

    >>> plain_linear(torch.zeros(3, 5), torch.zeros(3))
    Linear(in_features=5, out_features=3, bias=True)
    """
    lin = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                             device=weight.device, dtype=weight.dtype)
    return _hold(lin, weight, bias)


@torch.no_grad()
def _hold(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    layer.weight.copy_(weight.reshape(layer.weight.shape))
    if bias is not None:
        layer.bias.copy_(bias)
    return layer.requires_grad_(False).eval()
