"""A run that diverges is said so, for every built-in recipe: one NaN batch turned every weight
of an N:M, SAS, semi-structured or regularized model into NaN without a word (only the
thresholding methods noticed), the report then showed N:M at 0% sparsity, finalize failed on
torch's "atol must be greater than or equal to zero, but got -nan", and STR first blamed its
threshold decay for pruning every layer, then failed inside softshrink."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.deploy.finalize import FinalizeError
from sparsify.prepare.recipe import builtin_recipes

RECIPES = sorted(builtin_recipes())


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_weights_are_said_at_step_report_and_finalize(recipe):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = sparsify.sparsify(net(), recipe, total_steps=8, example_inputs=x[:1])
    opt = torch.optim.SGD(sparsify.param_groups(m, weight_decay=1e-4), lr=0.05)
    said = []
    for i in range(4):
        batch = torch.full_like(x, float("nan")) if i == 1 else x
        loss = F.cross_entropy(m(batch), y) + sparsify.penalty(m)
        opt.zero_grad(); loss.backward(); opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparsify.step(m)
        said += [str(w.message) for w in caught]
    diverged = [s for s in said if "NaN or inf in" in s]
    assert len(diverged) == 1 and "training diverged" in diverged[0], said
    assert not [s for s in said if "pruned every weight" in s], said  # NaN is not an emptied layer
    with pytest.warns(UserWarning, match="sparsify.report: NaN or inf in"):
        sparsify.report(m)
    with pytest.raises(FinalizeError, match="^sparsify.finalize: NaN or inf in .* nothing here is worth deploying$"):
        sparsify.finalize(m)


def test_a_finite_run_is_not_said_diverged():
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = sparsify.sparsify(net(), "st3", total_steps=8, example_inputs=x[:1])
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=0.05)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*NaN or inf")
        for _ in range(8):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m)
        sparsify.report(m)
        sparsify.finalize(m)
