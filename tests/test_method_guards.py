"""Method edges a one-line change would silently alter: STR's double backward, frozen weights and
empty-layer warning, SAS's rewiring through averages and odd-M slot split, l1-prune at sparsity 0
and its fixed masks, GMP's re-selection at a fix step off the pruning grid, and the targets that
semi-structured (begin == end) and N:M report."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.keep import EmptyLayerWarning
from sparsify.methods.dual import L1PruneMixin
from sparsify.methods.magnitude import MagnitudeMixin
from sparsify.methods.sas import SASLinear, SASMixin, SignedLevelsRule
from sparsify.methods.str import STRMixin
from sparsify.methods.str.kernel import soft_threshold, str_weight


def recipe(method, match="Linear", **params):
    return {"version": 1, "rules": [{"match": {"type": match}, "method": method, "params": params}]}


def only(m, cls):
    (layer,) = [mod for mod in m.modules() if isinstance(mod, cls)]
    return layer


# ---------------------------------------------------------------------------------------------
# STR
# ---------------------------------------------------------------------------------------------

def _str_grads_with_graph(fast: bool):
    """∂L/∂W and ∂L/∂s of a float64 STR linear map, taken with create_graph=True, through the
    one-pass kernel (fast) or the plain composition sign(W)·relu(|W| − sigmoid(s))."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    s = torch.tensor([-1.5], dtype=torch.float64, requires_grad=True)  # sigmoid(s) ≈ 0.18
    x = torch.randn(3, 6, dtype=torch.float64, generator=g)
    t = torch.sigmoid(s)
    assert bool((w.abs() <= t).any()) and bool((w.abs() > t).any())  # weights on both sides
    eff = soft_threshold(w, t) if fast else str_weight(w, t)
    return torch.autograd.grad((x @ eff.t()).square().sum(), [w, s], create_graph=True)


def test_str_double_backward_threshold_gradient_matches_plain_composition():
    """With create_graph=True, ∂L/∂s through the one-pass kernel equals plain autograd's, sign
    included (docs/methods/str.md, Per-step cost: double backward uses out-of-place formulas)."""
    _, gs_fast = _str_grads_with_graph(fast=True)
    _, gs_ref = _str_grads_with_graph(fast=False)
    assert float(gs_ref.detach()) < 0  # raising the threshold shrinks the weights: here it lowers the loss
    assert torch.allclose(gs_fast, gs_ref, rtol=1e-12, atol=0), (gs_fast, gs_ref)


def test_str_double_backward_weight_gradient_is_masked_by_the_threshold():
    """With create_graph=True, ∂L/∂W = ∂L/∂Ŵ ⊙ 1[|W| > sigmoid(s)] as plain autograd gives it, not
    straight-through (docs/methods/str.md, What it does and Per-step cost)."""
    gw_fast, _ = _str_grads_with_graph(fast=True)
    gw_ref, _ = _str_grads_with_graph(fast=False)
    assert int((gw_ref == 0).sum()) > 0
    assert torch.equal(gw_fast, gw_ref), (gw_fast - gw_ref).abs().max()


def test_str_frozen_weight_still_trains_the_threshold():
    """A layer whose weight is frozen (requires_grad False) still gives s its loss gradient, the
    plain composition's: s gets its gradient through the sigmoid (docs/methods/str.md, What it does)."""
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), recipe("str", s_init=-1.5), example_inputs=torch.randn(1, 8))
    layer = only(m, STRMixin)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 8)
    m(x).square().sum().backward()
    s = layer.s.detach().clone().requires_grad_(True)
    w = layer.weight.detach()
    F.linear(x, torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(s)), layer.bias.detach()).square().sum().backward()
    assert float(s.grad.abs()) > 0
    assert layer.s.grad is not None, "s got no gradient with the weight frozen"
    assert torch.allclose(layer.s.grad, s.grad, rtol=1e-5, atol=0), (layer.s.grad, s.grad)


def test_str_zero_initialized_layer_at_threshold_zero_is_warned_empty():
    """Under s_init = −3200 the threshold is exactly 0 (docs/methods/str.md, s_init), so a layer
    initialized at zero has |W| <= threshold everywhere: every weight pruned, no gradient, warned once."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    nn.init.zeros_(net[2].weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(net, recipe("str", s_init=-3200), example_inputs=torch.randn(1, 8))
        sparsify.step(m)
    empty = [str(w.message) for w in caught if issubclass(w.category, EmptyLayerWarning)]
    assert len(empty) == 1, empty
    assert "str pruned every weight of 2 " in empty[0], empty


# ---------------------------------------------------------------------------------------------
# SAS
# ---------------------------------------------------------------------------------------------

class PooledTwice(nn.Module):
    """relu → average pool → flatten, read by the head and returned as features too."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        f = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc(f), f


def test_sas_through_average_leaves_the_pooled_features_other_users_unchanged():
    """With through_average, the head reads avgpool(x), but another user of the pooled features
    still gets avgpool(relu(x)), not relu(avgpool(x)) (docs/methods/sas.md, The ReLU rewiring)."""
    net = PooledTwice().eval()
    x = torch.randn(2, 3, 8, 8)
    ref_features = net(x)[1]
    m = sparsify.sparsify(net, "sas", example_inputs=x, through_average=True).eval()
    assert isinstance(m.fc, SASLinear)
    features = m(x)[1]
    assert torch.equal(features, ref_features), (features - ref_features).abs().max()


class MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_sas_without_through_average_does_not_look_through_mean():
    """`mean` averages, so relu does not commute with it: with through_average=False a
    relu → mean → Linear head stays dense and the logits equal the dense model's
    (docs/methods/sas.md, The ReLU rewiring and Built-in recipes)."""
    net = MeanHead().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    plan = sparsify.plan(net, "sas", example_inputs=x, through_average=False)
    assert {e.name: e.method for e in plan.entries}["fc"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "rewrote nothing": the stem and the head both stay dense
        m = sparsify.sparsify(net, "sas", example_inputs=x, through_average=False).eval()
    assert not any(isinstance(mod, SASMixin) for mod in m.modules())
    assert torch.equal(m(x), ref)


def test_signed_levels_odd_m_gives_the_extra_slot_to_positive_inputs():
    """signed_levels splits M slots into P = ⌈M/2⌉ for x > 0 and N = ⌊M/2⌋ for x <= 0: M = 3 has
    two positive levels (cut at the half-normal median 0.674) and one non-positive slot
    (docs/methods/sas.md, General M)."""
    rule = SignedLevelsRule(3)
    assert (rule.n_pos, rule.n_neg) == (2, 1)
    assert [round(t, 3) for t in rule.pos_levels] == [0.674] and rule.neg_levels == []
    assert rule.relu_coefficients() == [1.0, 1.0, 0.0]
    assert rule.identity_coefficients() == [1.0, 1.0, -1.0]
    slots = torch.stack(rule.slots(torch.tensor([-1.5, -0.2, 0.2, 1.5])))
    assert torch.equal(slots, torch.tensor([[0.0, 0.0, 0.2, 0.0],    # x > 0, |x| <= 0.674
                                            [0.0, 0.0, 0.0, 1.5],    # x > 0, |x| > 0.674
                                            [1.5, 0.2, 0.0, 0.0]])), slots  # x <= 0


# ---------------------------------------------------------------------------------------------
# l1-prune (dual)
# ---------------------------------------------------------------------------------------------

def test_l1_prune_at_sparsity_zero_prunes_nothing():
    """l1-prune with sparsity 0 prunes no weight at its prune step (the fraction pruned is 0, as
    st3 and magnitude at 0; docs/methods/dual.md, Stages), not the one weight the quantile's
    count ⌊(N−1)r⌋+1 would take."""
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    dense = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    rec = recipe("l1-prune", l1=0.0, sparsity=0.0, prune_at=0, begin=0, end=4, min_density=0)
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 8))
    sparsify.step(m)
    layers = [mod for mod in m.modules() if isinstance(mod, L1PruneMixin)]
    assert [int((~layer.mask).sum()) for layer in layers] == [0, 0]
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, dense))


def test_l1_prune_masks_stay_fixed_after_the_prune_step():
    """After the prune step the masks are fixed (docs/methods/dual.md, Stages): a kept weight that
    training moves under the absolute threshold stays kept."""
    rec = recipe("l1-prune", l1=0.0, threshold=0.1, prune_at=0, begin=0, end=20)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(16, 4)), rec, example_inputs=torch.randn(1, 16))
    layer = only(m, L1PruneMixin)
    sparsify.step(m)  # the prune step: |W| <= 0.1 pruned
    fixed = layer.mask.clone()
    assert 0 < int((~fixed).sum()) < fixed.numel()
    i = int(fixed.flatten().nonzero()[0])
    with torch.no_grad():
        layer.weight.view(-1)[i] = 0.05
    sparsify.step(m)
    assert torch.equal(layer.mask, fixed), f"{int((~layer.mask).sum())} pruned, {int((~fixed).sum())} at the prune step"


# ---------------------------------------------------------------------------------------------
# magnitude (GMP)
# ---------------------------------------------------------------------------------------------

def test_magnitude_reselects_at_a_fix_step_off_the_pruning_grid():
    """With fix after end, masks are re-selected at the final sparsity until fix and frozen from
    there (docs/methods/magnitude.md, Fix): at fix = 7, off the every-4-steps grid, the frozen mask
    is the top half of |W| at step 7, not the mask of step 4."""
    rec = recipe("magnitude", sparsity=0.5, begin=0, end=4, fix=7, frequency=4, min_density=0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(16, 8)), rec, example_inputs=torch.randn(1, 16))
    layer = only(m, MagnitudeMixin)
    for t in range(10):
        if t == 5:  # the weights move after the last grid update (as an optimizer moves them)
            with torch.no_grad():
                layer.weight.copy_(torch.randn_like(layer.weight))
        sparsify.step(m)
    mags = layer.weight.detach().abs()
    expected = mags > mags.flatten().kthvalue(64).values  # ⌊(128 − 1)·0.5⌋ + 1 = 64 pruned
    assert torch.equal(layer.mask, expected), f"{int((layer.mask != expected).sum())} entries differ from step 7's"


# ---------------------------------------------------------------------------------------------
# reported targets: semi-structured, N:M
# ---------------------------------------------------------------------------------------------

def test_semistructured_one_step_schedule_reaches_its_sparsity_at_end():
    """begin == end == 5: the schedule is a step to the full sparsity at end (s(t_e) = s,
    docs/methods/semistructured.md, What it does), so the report at step 5 says 20%."""
    rec = recipe("semi-structured", match="Conv2d", sparsity=0.2, begin=5, end=5)
    m = sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), rec, example_inputs=torch.randn(1, 3, 8, 8))
    for _ in range(4):
        sparsify.step(m, loss=1.0)
    assert sparsify.report(m).layers[0].target == 0.0
    assert sparsify.step(m, loss=1.0) == 5
    rep = sparsify.report(m)
    assert rep.layers[0].target == 0.2
    assert rep.groups["rule0_semi_structured"]["target"] == 0.2


def test_nm_reports_the_sparsity_one_minus_n_over_m():
    """N:M keeps N of every M weights: 1:4 is 75% sparse, and the report's target says so and
    equals the achieved sparsity (docs/methods/nm.md, What it does)."""
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), recipe("nm", n=1, m=4), example_inputs=torch.randn(1, 8))
    sparsify.step(m)
    (row,) = sparsify.report(m).layers
    assert (row.target, row.final_target, row.achieved) == (0.75, 0.75, 0.75)
