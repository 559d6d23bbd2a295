"""Property: for every built-in recipe, a model captured with torch.export trains exactly like the
same model captured with torch.fx (docs/capture.md): random small traceable CNNs, the same seed
and data, a few training steps; the two agree in their outputs (train and eval), their penalties,
their plans and their state_dict keys."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify.prepare.recipe import builtin_recipes

RECIPES = sorted(builtin_recipes())


class SmallNet(nn.Module):
    def __init__(self, width: int, k: int, bn: bool, pool: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        y = self.pool(torch.relu(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def _x(batch, seed):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _captured(capture, net_args, recipe, x):
    torch.manual_seed(0)
    net = SmallNet(*net_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(net, recipe, example_inputs=x, capture=capture, total_steps=4)


def _train(model, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.05)
    losses = []
    for i in range(steps):
        loss = model(_x(4, seed + i)).square().mean() + sparsify.penalty(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(model)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("recipe", RECIPES)  # every recipe, whatever hypothesis draws
@settings(max_examples=4, deadline=None)
@given(width=st.integers(2, 6), k=st.sampled_from([1, 3, 5]), bn=st.booleans(), pool=st.booleans(),
       seed=st.integers(0, 1000))
def test_export_capture_trains_like_fx_capture(recipe, width, k, bn, pool, seed):
    x = _x(2, seed)
    fx_m = _captured("fx", (width, k, bn, pool), recipe, x)
    ex_m = _captured("export", (width, k, bn, pool), recipe, x)
    plan = sparsify.core.state.find_state
    assert [c["capture"] for c in plan(ex_m).plan.captures] == ["torch.export"]
    assert [c["capture"] for c in plan(fx_m).plan.captures] == ["torch.fx"]
    names = lambda m: [e.name for e in plan(m).plan.rewritten]  # noqa: E731
    assert names(ex_m) == names(fx_m)  # e.g. SAS through the head's mean in both
    assert set(ex_m.state_dict()) == set(fx_m.state_dict())
    got, want = _train(ex_m, 3, seed), _train(fx_m, 3, seed)  # losses, penalty included
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6), (recipe, got, want)
    xe = _x(3, seed + 7)
    for mode in ("train", "eval"):
        getattr(fx_m, mode)(), getattr(ex_m, mode)()
        torch.manual_seed(1)
        want = fx_m(xe)
        torch.manual_seed(1)
        got = ex_m(xe)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (recipe, mode, float((got - want).abs().max()))
