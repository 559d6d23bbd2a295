"""finalize says when the model gives one output whatever its input: a penalty too strong (tl1
at lam 50) or a sparsity too high can leave a model that ignores its input, and measure and
finalize stayed silent while finalize shipped it."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from loops import run_steps

SAID = "gives one and the same output for"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _train(model, steps=30):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]
    run_steps(model, torch.optim.SGD(sparsify.param_groups(model), lr=0.05, momentum=0.9), batches, penalty=True)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_that_ignores_its_input_is_said(batch):
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = sparsify.sparsify(_net(), "tl1", total_steps=30, example_inputs=(x,), lam=50.0)
    _train(model)
    with pytest.warns(UserWarning, match=f"{SAID} {2 if batch == 1 else batch} different example inputs"):
        sparsify.finalize(model)


def test_a_healthy_model_is_not():
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = sparsify.sparsify(_net(), "tl1", total_steps=30, example_inputs=(x,))
    _train(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.finalize(model)
    assert not [w for w in caught if SAID in str(w.message)]


def test_an_untrained_net_whose_input_part_rounds_away_is_not():
    """A freshly built MobileNetV3 in eval mode gives logits of 1e-10 beside its bias: after one
    step its two outputs were equal to the bit, yet it still depends on its input (a gradient)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    m = sparsify.sparsify(torchvision.models.mobilenet_v3_small(num_classes=10), "st3", example_inputs=(x,),
                          total_steps=2)
    run_steps(m, torch.optim.SGD(sparsify.param_groups(m), lr=0.01), [(x, y)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.finalize(m)
    assert not [w for w in caught if SAID in str(w.message)]
