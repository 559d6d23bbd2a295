"""A finalized layer keeps every attribute of the layer it was made from. Before, the plain copy
kept only the public ones, so a Conv with ``padding_mode`` reflect / circular / replicate (whose
forward reads the private ``_reversed_padding_repeated_twice``) failed in finalize's own check with
AttributeError for every weight recipe, and ``torch.jit.script`` of any finalized model with a
rewritten conv failed to compile ``Conv2d._conv_forward``."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparsify

RECIPES = sorted(sparsify.builtin_recipes())


def finalized(net, recipe, x, steps=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left dense, a schedule not run to its end: not tested here
        m = sparsify.sparsify(net, recipe, total_steps=2, example_inputs=x, copy=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(steps):  # masks, thresholds and position masks set, as after training
            loss = m(x).square().mean() + sparsify.penalty(m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m, loss=loss)
        return m, sparsify.finalize(m)


@pytest.mark.parametrize("recipe", RECIPES)
def test_convs_with_every_padding_mode_finalize(recipe):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=2, padding_mode="replicate"), nn.Flatten(), nn.Linear(8 * 10 * 10, 4))
    x = torch.randn(2, 4, 8, 8)
    m, final = finalized(net, recipe, x)
    with torch.no_grad():
        torch.testing.assert_close(final(x), m.eval()(x), rtol=1e-4, atol=1e-5)
    if not recipe.startswith("sas"):  # SAS's layers finalize to small graphs of their own (docs/methods/sas.md)
        modes = [c.padding_mode for c in final.modules() if isinstance(c, nn.Conv2d)]
        assert modes == ["reflect", "circular", "replicate"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_finalized_model_scripts(recipe):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    _, final = finalized(torchvision.models.resnet18(num_classes=10), recipe, x, steps=2)
    if recipe == "semi-structured":  # trained: its position masks have zeros and stay in the model
        assert any(type(m).__name__ == "DeployedPositionMask" for m in final.modules())
    scripted = torch.jit.script(final)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(final, x)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), final(x), rtol=0, atol=0)
        torch.testing.assert_close(traced(x), final(x), rtol=0, atol=0)
