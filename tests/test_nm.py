"""N:M weight sparsity: mask pattern, straight-through training, compliance in the report."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.methods.nm import NMMixin, nm_compliant, nm_mask
from sparsify.prepare.recipe import RecipeError


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, groups=16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))


X = torch.randn(2, 3, 8, 8)


def layers(m):
    return [mod for mod in m.modules() if isinstance(mod, NMMixin)]


def train(m, steps, lr=0.1):
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(m(X), torch.arange(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_mask_keeps_the_n_largest_of_every_m_input_channels(n, m):
    w = torch.randn(6, 16, 3, 3)
    mask = nm_mask(w, n, m)
    groups_w = w.abs().permute(0, 2, 3, 1).reshape(-1, m)
    groups_m = mask.permute(0, 2, 3, 1).reshape(-1, m)
    assert bool((groups_m.sum(1) == n).all())
    kept_min = torch.where(groups_m, groups_w, torch.inf).min(1).values
    pruned_max = torch.where(groups_m, -torch.inf, groups_w).max(1).values
    assert bool((kept_min >= pruned_max).all())
    assert nm_compliant(w * mask, n, m) and not nm_compliant(w, n, m)


def test_groups_run_along_input_channels_not_the_kernel():
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # kernel position 0: input channels 0, 1 win
    w[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # kernel position 1: input channels 2, 3 win
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True]


def test_ties_keep_the_lower_index():
    assert nm_mask(torch.ones(1, 8), 2, 4).tolist() == [[True, True, False, False] * 2]


def test_straight_through_gradient_reaches_pruned_weights():
    m = sparsify.sparsify(small_cnn(), "nm-2-4", total_steps=10, example_inputs=X)
    layer = layers(m)[0]
    w = layer.weight.detach().clone().requires_grad_(True)
    out = layer(torch.randn(2, 8, 6, 6).requires_grad_(False))
    assert torch.equal(layer.effective_weight().detach(), w.detach() * layer.mask)
    out.square().sum().backward()
    assert bool((layer.weight.grad[~layer.mask] != 0).any())


def test_sr_ste_decay_adds_to_pruned_gradients_only():
    grads = {}
    for decay in (0.0, 0.5):
        torch.manual_seed(3)
        m = sparsify.sparsify(small_cnn(), "nm-2-4", decay=decay, total_steps=10, example_inputs=X)
        layer = layers(m)[0]
        layer(torch.ones(1, 8, 4, 4)).sum().backward()
        grads[decay] = (layer.weight.grad.clone(), layer.mask.clone(), layer.weight.detach().clone())
    (g0, mask, w), (g1, _, _) = grads[0.0], grads[0.5]
    assert torch.allclose(g1 - g0, 0.5 * w * ~mask, atol=1e-6)
    assert bool((g1 != g0).any())


def test_training_keeps_every_layer_compliant_and_the_report_says_so():
    m = sparsify.sparsify(small_cnn(), "nm-2-4", total_steps=8, example_inputs=X)
    plan = sparsify.core.state.find_state(m).plan
    dense = {e.name: e.reason for e in plan.dense}
    assert "input channels" in dense["0"] and "input channels" in dense["4"]  # RGB stem, depthwise
    before = [l.mask.clone() for l in layers(m)]
    train(m, 8, lr=0.5)
    assert any(not torch.equal(a, l.mask) for a, l in zip(before, layers(m)))  # masks moved
    rep = sparsify.report(m)
    assert rep.groups["rule0_nm"]["nm_compliant"] is True
    assert all(r.extra["nm_compliant"] for r in rep.layers)
    assert all(r.weight_sparsity >= 0.5 for r in rep.layers)
    # fixed at 90% of training (step 7): hard mask, zero gradient to pruned weights
    assert rep.groups["rule0_nm"]["phase"] == "fixed"
    m(X).sum().backward()
    for l in layers(m):
        assert bool((l.weight.grad[~l.mask] == 0).all())
    final = sparsify.finalize(m)
    for name, mod in final.named_modules():
        if name in ("2", "7"):
            assert nm_compliant(mod.weight, 2, 4)


def test_report_flags_a_violation():
    m = sparsify.sparsify(small_cnn(), "nm-2-4", total_steps=8, example_inputs=X)
    layers(m)[0].mask.fill_(True)  # e.g. a bad checkpoint
    rep = sparsify.report(m)
    assert rep.groups["rule0_nm"]["nm_compliant"] is False
    assert [r.extra["nm_compliant"] for r in rep.layers] == [False, True]


def test_before_begin_the_model_is_dense():
    m = sparsify.sparsify(small_cnn(), "nm-2-4", begin=3, fix=None, example_inputs=X)
    assert all(bool(l.mask.all()) for l in layers(m))
    train(m, 3)
    assert all(float(l.mask.float().mean()) == 0.5 for l in layers(m))


def test_target_sparsity_is_one_minus_n_over_m_from_begin():
    # what the report shows as the target: 0 before `begin`, 1 − N/M at `begin` and after
    m = sparsify.sparsify(small_cnn(), "nm-2-4", begin=2, fix=None, example_inputs=X)
    (g,) = sparsify.api.find_state(m).groups.values()
    assert [g.target(t) for t in (1, 2, 3)] == [0.0, 0.5, 0.5]


def test_reported_phase_changes_at_begin_and_fix():
    m = sparsify.sparsify(small_cnn(), "nm-2-4", begin=2, fix=5, example_inputs=X)
    (g,) = sparsify.api.find_state(m).groups.values()
    phases = {t: g.describe(t)["phase"] for t in (1, 2, 4, 5, 6)}
    assert phases == {1: "dense", 2: "straight-through", 4: "straight-through", 5: "fixed", 6: "fixed"}


def test_bad_n_m():
    with pytest.raises(RecipeError, match="1 <= n < m"):
        sparsify.sparsify(small_cnn(), "nm-2-4", n=4, m=4)
