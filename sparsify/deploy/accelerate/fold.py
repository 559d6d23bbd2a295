"""BatchNorm folding for the convs that stay dense in an accelerated model.

A patch-skipping conv folds the BatchNorm after it; a dense conv should too, or an accelerated
network would pay for every BN that the strongest dense deployment (channels-last, BN folded)
does not. Two cases:

* conv -> BN: the conv gets the folded weight and bias, the BN node goes;
* conv -> position mask -> BN (a semi-structured layer that stays dense): the conv is folded,
  and :class:`PositionFill` writes ``BN(0)`` (the folded bias of the bias-free conv) at the
  skipped positions, which is what ``BN(conv(x) ⊙ mask)`` holds there.

>>> import torch
>>> conv, bn = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3).eval()
>>> x = torch.randn(1, 2, 5, 5)
>>> bool(torch.allclose(folded_conv(conv, bn)(x), bn(conv(x)), atol=1e-6))
True
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify.deploy.accelerate.patch_conv import fold_bn

__all__ = ["folded_conv", "PositionFill", "foldable_bn"]


def foldable_bn(module: nn.Module | None) -> bool:
    """Whether ``module`` is a BatchNorm2d whose eval output is a fixed per-channel affine map.

    >>> foldable_bn(torch.nn.BatchNorm2d(4).eval()), foldable_bn(torch.nn.BatchNorm2d(4))
    (True, False)
    """
    return (isinstance(module, nn.BatchNorm2d) and module.track_running_stats and not module.training
            and module.running_mean is not None)


@torch.no_grad()
def folded_conv(conv: nn.Conv2d, bn: nn.Module, masked: bool = False) -> nn.Conv2d:
    """A new ``nn.Conv2d`` computing ``bn(conv(x))`` (eval BN). With ``masked`` the result
    computes ``bn(conv(x))`` at kept positions; pair it with :class:`PositionFill`.

    >>> c = folded_conv(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2).eval())
    >>> c.bias is not None
    True
    """
    w, b = fold_bn(conv.weight, conv.bias, bn)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    new.bias.copy_(b)
    new.requires_grad_(False)
    return new.eval()


class PositionFill(nn.Module):
    """Writes the per-channel ``fill`` at the output positions where ``keep`` is False, in place
    (the input is a fresh conv output nobody else reads). ``relu`` fills ``relu(fill)``.

    >>> f = PositionFill(torch.tensor([[True, False]]), torch.tensor([5.0]))
    >>> f(torch.zeros(1, 1, 1, 2)).tolist()
    [[[[0.0, 5.0]]]]
    """

    def __init__(self, keep: torch.Tensor, fill: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.bool().clone())
        self.register_buffer("fill", fill.detach().clone().float())
        self.register_buffer("skipped", (~self.keep.flatten()).nonzero().flatten(), persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.shape
        if (h, w) != tuple(self.keep.shape):
            raise ValueError(f"PositionFill was built for {tuple(self.keep.shape)} outputs, got {(h, w)}")
        fill = self.fill.to(y.dtype)
        if y.is_contiguous(memory_format=torch.channels_last):  # skipped positions are whole rows of NHWC
            y.permute(0, 2, 3, 1).view(n, h * w, c)[:, self.skipped] = fill
        else:
            y.view(n, c, h * w)[:, :, self.skipped] = fill.view(1, c, 1)
        return y

    def computed_positions(self) -> torch.Tensor:
        """The output positions of the conv before it that the model needs (the others it
        overwrites): ``sparsify.measure`` counts that conv's multiplies there only, as it does
        for the position mask this fill replaced."""
        return self.keep

    def extra_repr(self) -> str:
        return f"channels={self.fill.numel()}, skipped={self.skipped.numel()}/{self.keep.numel()} positions"
