"""Dual sparse training: the staged recipe ``dual`` (dense → weight ℓ1 + pruning → activation Tℓ1)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.methods.dual import L1PruneMixin
from sparsify.methods.regularizers import ActivationRegularizer
from sparsify.core.threshold import pruned_count


def layers(model):
    return [m for m in model.modules() if isinstance(m, L1PruneMixin)]


def test_stages_in_order_on_resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    m = sparsify.sparsify(net, "dual", sparsity=0.5, example_inputs=x, total_steps=10)  # stages 0-3, 3-6 (prune at 4/5), 6-
    opt = torch.optim.SGD(sparsify.param_groups(m, 0.0), lr=0.01)
    reg_nodes = [r for r in m.modules() if isinstance(r, ActivationRegularizer)]
    n_weights = sum(mod.weight.numel() for mod in layers(m))
    seen = []
    groups = m.sparsify_state.groups
    for t in range(10):
        info = groups["rule0_l1_prune"].describe(t)  # what the report's group line shows
        assert groups["rule1_tl1"].describe(t)["stage"] == info["stage"]
        out = m(x)
        l1_on = any(mod.records for mod in layers(m))
        act_on = any(r.records for r in reg_nodes)
        seen.append((info["stage"], info["phase"], l1_on, act_on))
        loss = F.cross_entropy(out, y) + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        if t == 7:  # masks kept in stage 3: pruned weights get no gradient
            for mod in layers(m):
                assert bool((mod.weight.grad[~mod.mask] == 0).all())
        opt.step()
        if t == 4:  # the magnitudes the pruning step below sees
            mags = torch.cat([mod.weight.detach().abs().reshape(-1) for mod in layers(m)])
        sparsify.step(m, loss=loss)
    assert [s[0] for s in seen] == ["dense"] * 3 + ["weights"] * 3 + ["activations"] * 4
    assert [s[1] for s in seen] == ["dense"] * 3 + ["l1"] * 2 + ["fixed"] * 5
    assert [s[2] for s in seen] == [False] * 3 + [True] * 2 + [False] * 5
    assert [s[3] for s in seen] == [False] * 6 + [True] * 4
    # one global threshold, exact count, zeros still there after more optimizer steps
    zeros = sum(int((mod.deployed_weight() == 0).sum()) for mod in layers(m))
    k = pruned_count(n_weights, 0.5)
    # k weights, plus any tied with the k-th smallest: ties among 11 M float32 magnitudes are
    # common, and which ones occur depends on the thread count (rounding of the conv gradients)
    assert zeros == int((mags <= mags.kthvalue(k).values).sum()) >= k
    assert "stage=activations" in str(sparsify.report(m))
    f = sparsify.finalize(m)
    assert type(f.conv1) is nn.Conv2d and not any(isinstance(r, ActivationRegularizer) for r in f.modules())
    assert int((f.conv1.weight == 0).sum()) == int((~layers(m)[0].mask).sum())


def test_l1_penalty_value_and_absolute_threshold():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    rec = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"l1": 0.5, "threshold": 0.2, "begin": 0, "end": 4}}]}
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 4))
    m(torch.randn(2, 4))
    expected = 0.5 * float(net[0].weight.abs().sum() + net[2].weight.abs().sum())
    assert float(sparsify.penalty(m)) == pytest.approx(expected, rel=1e-6)
    for _ in range(2):
        sparsify.step(m)
    for mod, dense in zip(layers(m), (net[0], net[2])):
        assert torch.equal(mod.mask, dense.weight.abs() > 0.2)
    m(torch.randn(2, 4))
    assert sparsify.penalty(m) == 0.0  # the ℓ1 term stops once the masks are fixed



@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_pruning_by_sparsity_removes_the_exact_count_and_the_weights_at_the_threshold(sparsity):
    # |w| <= τ is pruned: τ, the linear-interpolated quantile, is itself a weight when (N-1)·r is
    # whole, and that weight goes too (floor((N-1)·r) + 1 pruned, as st3 and magnitude)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 4))  # N = 21 weights: (N-1)·r whole
    rec = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"l1": 0.0, "sparsity": sparsity, "min_density": 0.0,
                                               "begin": 0, "end": 2}}]}
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 3))
    for _ in range(2):
        sparsify.step(m)
    n = sum(mod.weight.numel() for mod in layers(m))
    assert sum(int((~mod.mask).sum()) for mod in layers(m)) == pruned_count(n, sparsity)


def test_pruning_at_sparsity_zero_removes_nothing():
    # docs/methods/dual.md: none at sparsity 0, as st3 and magnitude (the quantile's count would take one)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 4))
    rec = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"sparsity": 0.0, "min_density": 0.0, "begin": 0, "end": 2}}]}
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 3))
    for _ in range(2):
        sparsify.step(m)
    assert all(mod._fixed and bool(mod.mask.all()) for mod in layers(m))


def test_target_sparsity_is_reached_at_the_prune_step():
    # what the report shows as the target: 0 until the prune step, `sparsity` from it on
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 4))
    rec = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"sparsity": 0.5, "begin": 0, "end": 4}}]}
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 3))
    (g,) = sparsify.api.find_state(m).groups.values()
    assert g.prune_step == 2
    assert [g.target(t) for t in (1, 2, 3)] == [0.0, 0.5, 0.5]


def test_prune_step_zeroes_the_pruned_latent_weights_and_the_state_dict():
    # not only W ⊙ M in the forward: .weight itself (what a dense load or an export reads) is zero there
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    before = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    rec = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"l1": 0.0, "threshold": 0.2, "begin": 0, "end": 2}}]}
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 6))
    for _ in range(2):
        sparsify.step(m)
    state = m.state_dict()
    mods = {name: mod for name, mod in m.named_modules() if isinstance(mod, L1PruneMixin)}
    for (name, mod), w in zip(mods.items(), before):
        kept = w.abs() > 0.2
        assert 0 < int(kept.sum()) < w.numel()
        assert torch.equal(mod.weight.detach(), w * kept)
        assert torch.equal(state[f"{name}.weight"], w * kept)


def test_checkpoint_resume_keeps_masks_and_flags():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    a = sparsify.sparsify(net, "dual", example_inputs=x, total_steps=10)
    for _ in range(7):
        sparsify.step(a)
    b = sparsify.sparsify(net, "dual", example_inputs=x, total_steps=10)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p.mask, q.mask) and q._fixed for p, q in zip(layers(a), layers(b)))
    assert all(r.active for r in b.modules() if isinstance(r, ActivationRegularizer))
    assert torch.equal(a(x), b(x))


def test_unknown_stage_and_missing_total_steps_are_clear_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    bad = json.loads(sparsify.load_recipe("dual").to_json())  # an editable copy (its data is read-only)
    bad["rules"][1]["params"]["stage"] = "activation"
    with pytest.raises(ValueError, match="unknown stage 'activation'.*'activations'"):
        sparsify.sparsify(net, bad, example_inputs=torch.randn(1, 4), total_steps=10)
    with pytest.raises(sparsify.ScheduleError, match="total_steps"):
        sparsify.sparsify(net, "dual", example_inputs=torch.randn(1, 4))


def test_sigma_scales_the_global_threshold_as_st3_sigma():
    """``sigma``: the exact count of the smallest ``|W| / σ_l`` is pruned (not of ``|W|``), so a
    big layer prunes harder than under the plain global threshold; the same allocation as st3-sigma."""
    from sparsify.core.keep import sigma_of
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32 * 4 * 4, 10))
    x = torch.randn(2, 3, 8, 8)
    rule = {"match": {"type": ["Conv2d", "Linear"]}, "method": "l1-prune",
            "params": {"sparsity": 0.6, "begin": 0, "end": 2, "prune_at": 0, "min_density": 0}}
    plain = sparsify.sparsify(net, {"version": 1, "rules": [rule]}, example_inputs=x, copy=True)
    rule["params"]["sigma"] = True
    scaled = sparsify.sparsify(net, {"version": 1, "rules": [rule]}, example_inputs=x, copy=True)
    sparsify.step(plain)
    sparsify.step(scaled)
    score = torch.cat([(mod.weight.detach().abs() / sigma_of(mod.weight)).reshape(-1) for mod in (net[0], net[2], net[5])])
    n = score.numel()
    pruned = torch.cat([(~mod.mask).reshape(-1) for mod in layers(scaled)])
    assert int(pruned.sum()) == pruned_count(n, 0.6)
    assert torch.equal(pruned, score <= score.kthvalue(pruned_count(n, 0.6)).values)
    # the plain global threshold prunes the classifier (most weights, smallest σ-free magnitudes) differently
    assert not torch.equal(layers(plain)[2].mask, layers(scaled)[2].mask)
    st3s = sparsify.sparsify(net, "st3-sigma", sparsity=0.6, begin=0, end=0, fix=None, min_density=0,
                             example_inputs=x, copy=True)
    sparsify.step(st3s)
    st3_layers = [mod for mod in st3s.modules() if hasattr(mod, "mask")]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(layers(scaled), st3_layers))


def test_sigma_with_an_absolute_threshold_is_a_clear_error():
    rec = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"threshold": 0.2, "sigma": True}}]}
    with pytest.raises(sparsify.RecipeError, match=r"sigma.*absolute 'threshold'"):
        sparsify.sparsify(nn.Sequential(nn.Linear(4, 3)), rec)
