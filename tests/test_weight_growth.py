"""Runaway weights are said before any NaN: ST-3 on torchvision's MobileNetV2 grew its latent
weights from 5 to 1e7 within a dozen steps (a BatchNorm after an emptied channel amplifies the
straight-through gradient) and nothing was said until the weights were NaN
(sparsify/core/weight_growth.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.weight_growth import largest_weights
from sparsify.prepare.recipe import builtin_recipes
from warned import said

# the built-in recipes that rewrite Conv/Linear weights (the activation ones add nodes only, and
# semi-structured masks the layers' outputs)
WEIGHT_RECIPES = sorted(r for r in builtin_recipes() if not r.startswith(("activation", "tl1", "semi")))


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _train(m, steps, x, y, lr=0.05, at=None):
    """``steps`` SGD steps; ``at(step)`` runs after each step's ``sparsify.step``; the messages said."""
    opt = torch.optim.SGD(sparsify.param_groups(m, weight_decay=1e-4), lr=lr)
    out = []
    for t in range(1, steps + 1):
        loss = F.cross_entropy(m(x), y) + sparsify.penalty(m)
        opt.zero_grad(); loss.backward(); opt.step()
        out += said(sparsify.step, m)
        if at is not None:
            at(t)
    return out


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_a_layer_whose_weights_run_away_is_said_once(recipe):
    """Weights that grow 1000x between two looks are named, once, with the steps and the sizes."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = sparsify.sparsify(net(), recipe, total_steps=40, example_inputs=x[:1])
    assert largest_weights(m), "no sparse layer: the recipe belongs in the other list"
    name = next(n for n, mod in m.named_modules() if isinstance(mod, SparseWeightMixin))

    def blow_up(t):
        if t == 4:
            with torch.no_grad():
                m.get_submodule(name).weight.mul_(1000.0)
    messages = [s for s in _train(m, 20, x, y, lr=1e-4, at=blow_up) if "grew" in s]
    assert len(messages) == 1, messages
    assert messages[0].startswith("sparsify.step: the weights of 1 sparse layer(s) grew from step 1 to step 8 "
                                  f"({name}: largest |w| "), messages[0]


def test_a_healthy_run_says_nothing_of_growth():
    """Sixty ordinary SGD steps under st3 keep every layer within a small factor of its start."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    m = sparsify.sparsify(net(), "st3", total_steps=60, example_inputs=x[:1])
    assert not [s for s in _train(m, 60, x, y) if "grew" in s]


def test_layers_that_grow_from_a_tiny_start_and_stay_small_are_not_said():
    """A layer started at zero, or very small, may grow thousands of times and stay below 10: an
    initialisation catching up, not a divergence."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    model = net()
    with torch.no_grad():
        model[-1].weight.zero_()
        model[0].weight.mul_(1e-3)
    m = sparsify.sparsify(model, "gmp", total_steps=40, example_inputs=x[:1])

    def grow(t):
        if t == 4:
            with torch.no_grad():
                m.get_submodule("6").weight.add_(5.0)  # from zero (4e-6 after the first step)
                m.get_submodule("0").weight.mul_(200.0)  # 200x, still small
    assert not [s for s in _train(m, 16, x, y, lr=1e-4, at=grow) if "grew" in s]


def test_nan_weights_are_left_to_the_divergence_warning():
    """Weights turned NaN are said once, as NaN (core/diverged.py), not also as grown."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = sparsify.sparsify(net(), "gmp", total_steps=40, example_inputs=x[:1])

    def poison(t):
        if t == 4:
            with torch.no_grad():
                m.get_submodule("0").weight.fill_(float("nan"))
    messages = _train(m, 8, x, y, lr=1e-4, at=poison)
    assert [s for s in messages if "NaN or inf in" in s] and not [s for s in messages if "grew" in s], messages
