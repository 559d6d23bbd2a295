"""torch.func on a sparsified model: per-sample gradients (``vmap(grad(...))`` over
``functional_call``, what Opacus' functorch mode and meta-learning code run) equal the gradients
of one autograd backward per sample, for every built-in recipe, mid-schedule (masks and
thresholds set). The custom autograd functions of ST-3 and N:M needed ``setup_context`` for this,
and SAS runs its plain-ops reference forward under a transform (its kernel's workspace and
``out=`` writes are not functorch's)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import sparsify

X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def _trained(recipe: str, steps: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 4))
    model = sparsify.sparsify(net, recipe, total_steps=2 * steps, example_inputs=(X,))
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(model(X), Y) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model)
    return model


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_per_sample_gradients_equal_one_backward_per_sample(recipe):
    model = _trained(recipe)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        out = functional_call(model, (p, buffers), (x[None],))
        return F.cross_entropy(out, y[None]) + sparsify.penalty(model)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    for i in range(len(X)):
        model.zero_grad()
        (F.cross_entropy(model(X[i:i + 1]), Y[i:i + 1]) + sparsify.penalty(model)).backward()
        for name, p in model.named_parameters():
            expected = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[name][i], expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the transform's forwards leave nothing behind that the next step would warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.zero_grad()
        sparsify.step(model)
