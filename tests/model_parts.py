"""Small pieces several test files build models and read results with."""
from __future__ import annotations

import torch
from torch import nn


def random_bn(c: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d with random affine parameters and running statistics (what folding
    it into a conv must reproduce)."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


def only(model: nn.Module, cls: type) -> nn.Module:
    """The one submodule of ``model`` that is a ``cls``."""
    (layer,) = [mod for mod in model.modules() if isinstance(mod, cls)]
    return layer


def only_group(model: nn.Module):
    """The one method group of a sparsified ``model``."""
    (g,) = model.sparsify_state.groups.values()
    return g
