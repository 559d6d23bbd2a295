"""Guards found by mutation testing that fit no other file: behaviour a one-line change in the
library would silently alter."""
from __future__ import annotations

import math

import pytest
import torch

from sparsify.methods.sas import SASConv2d, SASLinear


@pytest.mark.parametrize("make, narrow_fan_in", [
    (lambda: SASConv2d(16, 512, 3, padding=1), 16 * 9),   # M = 2: the wide fan-in is 2·16·9
    (lambda: SASLinear(64, 512, m=4), 64),                # M = 4: the wide fan-in is 4·64
])
def test_sas_bias_init_uses_the_narrow_fan_in(make, narrow_fan_in):
    # official SASConv2d: bias ~ U(±1/sqrt(fan_in of the dense layer)), not of the M-times wider weight
    torch.manual_seed(0)
    layer = make()
    bound = 1 / math.sqrt(narrow_fan_in)
    top = float(layer.bias.abs().max())
    assert top <= bound + 1e-7
    assert top > 0.9 * bound  # 512 draws: all below 0.9·bound has probability 0.9**512
