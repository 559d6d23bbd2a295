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


def test_finalize_refuses_nan_outputs_of_finite_parameters_in_one_line():
    """Finite weights large enough that an activation overflows (inf - inf = NaN in the next layer):
    finalize says so in one FinalizeError, not torch's 'atol must be greater than or equal to zero'."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # 2 x 3e38 overflows to inf
        model[1].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    m = sparsify.sparsify(model, "gmp", total_steps=100, example_inputs=torch.ones(1, 2))  # dense at step 0
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with pytest.raises(FinalizeError, match="^sparsify.finalize: the trained model answers the example inputs with "
                                            "NaN although its parameters are finite"):
        sparsify.finalize(m)
    with pytest.raises(FinalizeError, match="example inputs hold NaN or inf"):
        sparsify.finalize(m, example_inputs=torch.full((1, 2), float("nan")))
