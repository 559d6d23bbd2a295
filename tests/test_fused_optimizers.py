"""Optimizers that write weights without bumping their version counter: torch's fused AdamW and
SGD kernels (``fused=True``; transformers' ``Trainer`` uses fused AdamW by default) and writes
through ``.data``. A layer that kept an effective weight computed before the write would keep
computing with the old weights; after every ``sparsify.step`` the forward must use the new ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin

RECIPES = sorted(sparsify.builtin_recipes())
X = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 2, 3, 4])


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))


def recomputed(model) -> torch.Tensor:
    """The eval output with every layer's cached values forgotten: what the weights give now."""
    for m in model.modules():
        if isinstance(m, SparseWeightMixin):
            m.drop_caches(free=True)
    return model(X)


def make_optimizer(kind: str, model):
    groups = sparsify.param_groups(model, 5e-3)
    if kind == "adamw-fused":
        return torch.optim.AdamW(groups, lr=0.05, fused=True)
    if kind == "sgd-fused":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True)
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # "data": writes through .data below


@pytest.mark.parametrize("kind", ["adamw-fused", "sgd-fused", "data"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_forward_after_each_step_uses_the_new_weights(recipe, kind):
    # STR starts exactly dense at its official s_init; -3 puts its soft threshold in play at once
    kw = {"s_init": -3.0} if recipe.startswith("str") else {}
    model = sparsify.sparsify(net(), recipe, total_steps=12, example_inputs=X[:1], **kw)
    opt = make_optimizer(kind, model)
    outputs = []
    for _ in range(4):
        model.train()
        loss = F.cross_entropy(model(X), Y) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        if kind == "data":  # the same update as opt.step(), written where the version counter does not see it
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-0.1)
        else:
            opt.step()
        sparsify.step(model)
        model.eval()
        with torch.no_grad():
            seen = model(X)
            assert torch.equal(seen, recomputed(model)), f"{recipe}: the forward used weights from before the step"
        outputs.append(seen)
    assert not torch.equal(outputs[0], outputs[-1])  # it trained
