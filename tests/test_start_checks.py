"""What sparsify() refuses about the model's values before it rewrites anything, and what a magnitude
threshold cannot do (split tied magnitudes), said rather than left for the report to show."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("begin", [0, 0.5])  # thresholded at once, or only later (the default begin)
def test_a_model_with_nan_or_inf_weights_is_refused_naming_the_parameter(value, begin):
    model = net()
    with torch.no_grad():
        model[2].weight[0, 0] = value
    with pytest.raises(ValueError, match=r"NaN or inf in 1 parameter\(s\) of the model given \(2\.weight\), "
                                         r"before any training"):
        sparsify.sparsify(model, "gmp", total_steps=100, begin=begin, end=begin)
    assert type(model[2]) is nn.Linear  # nothing was rewritten


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
def test_tied_magnitudes_that_keep_the_target_from_being_reached_are_warned(recipe):
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.1)
    with pytest.warns(UserWarning, match=r"reached 0\.0% sparsity where its target is 50\.0% .*same magnitude"):
        m = sparsify.sparsify(model, recipe, total_steps=4, begin=0, end=0, sparsity=0.5)  # masks made at step 0
        for _ in range(4):
            sparsify.step(m)
    assert sparsify.report(m).totals["weight_sparsity"] == 0.0


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
def test_tied_magnitudes_that_overshoot_the_target_are_warned(recipe):
    """Weights of three magnitudes (quantized): the threshold lands on one of them and prunes every
    weight equal to it, 67% where 50% is asked, and that is said."""
    model = net()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(1, 4, p.shape, generator=gen).float() * 0.1)
    with pytest.warns(UserWarning, match=r"reached 6\d\.\d% sparsity where its target is 50\.0% .*prunes every weight "
                                         r"equal to it"):
        m = sparsify.sparsify(model, recipe, total_steps=4, begin=0, end=0, sparsity=0.5)
        for _ in range(4):
            sparsify.step(m)
    assert sparsify.report(m).totals["weight_sparsity"] > 0.6


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
def test_trained_weights_reach_the_target_without_that_warning(recipe):
    m = sparsify.sparsify(net(), recipe, total_steps=4, begin=0, end=2, sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            sparsify.step(m)
    assert sparsify.report(m).totals["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
