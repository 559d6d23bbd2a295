"""Method edges that a one-line change would silently alter (second pass): GMP's re-selection pace
after a one-step schedule, the steps it says it reads weights on, its phase at fix and its reported
threshold beside a layer held at min_density; l1-prune leaving the caller's model alone when it
prunes at step 0, its reported threshold and target, its ℓ1 term in eval mode and across a
checkpoint; N:M's target at begin and its gradients under torch.func; semi-structured's tie between
equally good maps, its no-loss warning, its silence at sparsity 0, all-ones masks after a load and
its 1x1 default; the Tℓ1 regularizer's active flag across a checkpoint."""
from __future__ import annotations

import torch
from torch import nn

import sparsify
from sparsify.methods.dual import L1PruneMixin
from sparsify.methods.magnitude import MagnitudeMixin
from sparsify.methods.nm import NMMixin

from model_parts import only, only_group
from warned import said, warned


def recipe(method, match="Linear", **params):
    return {"version": 1, "rules": [{"match": {"type": match}, "method": method, "params": params}]}








# ---------------------------------------------------------------------------------------------
# magnitude (GMP)
# ---------------------------------------------------------------------------------------------

def test_magnitude_one_step_schedule_keeps_the_mask_between_end_and_fix():
    """begin == end with a later fix: the mask is set at end, then re-selected on the Δt = 100 step
    grid (Zhu & Gupta's default: a zero-length ramp has no 32 updates to fit) and at fix, not
    after every step (sparsify/methods/magnitude.py, pruning_interval)."""
    torch.manual_seed(0)
    rec = recipe("magnitude", sparsity=0.5, begin=1, end=1, fix=6, min_density=0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(16, 8)), rec, example_inputs=torch.randn(1, 16))
    layer = only(m, MagnitudeMixin)
    changed = []
    for _ in range(8):
        with torch.no_grad():  # the weights move every step, as an optimizer moves them
            layer.weight.copy_(torch.randn_like(layer.weight))
        before = layer.mask.clone()
        t = sparsify.step(m)
        if not torch.equal(before, layer.mask):
            changed.append(t)
    assert changed == [1, 6], changed


def test_magnitude_says_it_reads_the_weights_exactly_on_its_selection_steps():
    """The group reads the weights (FSDP2 gathers them, docs/distributed.md) at the pruning steps on
    the frequency grid, at end and at a fix step off the grid, and on no step after fix."""
    rec = recipe("magnitude", sparsity=0.5, begin=0, end=4, fix=7, frequency=4, min_density=0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(16, 8)), rec, example_inputs=torch.randn(1, 16))
    assert [t for t in range(12) if only_group(m).reads_weights(t)] == [4, 7]


def test_magnitude_phase_is_fixed_from_the_fix_step():
    """The report's GMP phase: "hold" between end and fix (masks re-selected at the final sparsity),
    "fixed" from the fix step itself on (docs/methods/magnitude.md, Fix)."""
    rec = recipe("magnitude", sparsity=0.5, begin=0, end=2, fix=4, min_density=0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(16, 8)), rec, example_inputs=torch.randn(1, 16))
    phases = [sparsify.report(m).groups["rule0_magnitude"]["phase"]]
    for _ in range(5):
        sparsify.step(m)
        phases.append(sparsify.report(m).groups["rule0_magnitude"]["phase"])
    assert phases == ["ramp", "ramp", "hold", "hold", "fixed", "fixed"]


def _one_floored_layer(method, **params):
    """Two Linear layers, the first so small that a global threshold would prune all of it: held at
    min_density, its own threshold is lower than the global one that the second layer gets."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
    rec = recipe(method, sparsity=0.5, begin=0, end=0, min_density=0.25, **params)
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 4))
    return net, m, sparsify.report(m).groups[next(iter(m.sparsify_state.groups))]


def _check_global_threshold(net, m, threshold, cls):
    small, big = [mod for mod in m.modules() if isinstance(mod, cls)]
    assert int(small.mask.sum()) == 8  # held at min_density: a quarter of its 32 weights kept
    mags = net[1].weight.detach().abs()  # the caller's model keeps the unpruned values
    assert 0 < int((~big.mask).sum()) < big.mask.numel()
    assert float(mags[~big.mask].max()) <= threshold < float(mags[big.mask].min())


def test_magnitude_reports_the_global_threshold_when_a_layer_is_held_at_min_density():
    """The report's GMP threshold is the global one the other layers are pruned by, not the own
    threshold of a layer held at min_density (docs/methods/magnitude.md)."""
    net, m, described = _one_floored_layer("magnitude")
    assert described["held_at_min_density"] == ["0"]
    _check_global_threshold(net, m, described["threshold"], MagnitudeMixin)


# ---------------------------------------------------------------------------------------------
# l1-prune (dual)
# ---------------------------------------------------------------------------------------------

def test_l1_prune_reports_the_global_threshold_when_a_layer_is_held_at_min_density():
    """l1-prune's reported threshold is the global one, not the lower own threshold of a layer held
    at min_density (docs/methods/dual.md)."""
    net, m, described = _one_floored_layer("l1-prune", l1=0.0, prune_at=0)
    assert described["held_at_min_density"] == ["0"]
    _check_global_threshold(net, m, described["threshold"], L1PruneMixin)


def test_l1_prune_at_step_zero_leaves_the_callers_model_unchanged():
    """prune_at = 0 prunes inside sparsify() (step 0): the pruned weights are zeroed in the
    sparsified model's own copy, the model given to sparsify() keeps its weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    dense = net[0].weight.detach().clone()
    rec = recipe("l1-prune", l1=0.0, sparsity=0.5, prune_at=0, begin=0, end=4, min_density=0)
    m = sparsify.sparsify(net, rec, example_inputs=torch.randn(1, 16))
    assert int((~only(m, L1PruneMixin).mask).sum()) == 64  # ⌊(128 − 1)·0.5⌋ + 1
    assert torch.equal(net[0].weight, dense)


def test_l1_prune_target_switches_at_the_prune_step():
    """l1-prune's reported target is 0 before its prune step and the sparsity from that step on
    (prune_at 0.5 of [0, 4]: step 2)."""
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), recipe("l1-prune", l1=0.0, prune_at=0.5, begin=0, end=4),
                          example_inputs=torch.randn(1, 8))
    targets = []
    for _ in range(3):
        sparsify.step(m)
        targets.append(sparsify.report(m).layers[0].target)
    assert targets == [0.0, 0.5, 0.5]


def test_l1_prune_records_no_penalty_in_eval_mode_or_without_autograd():
    """The ℓ1 term is recorded in training-mode forwards with autograd on only (docs/methods/dual.md):
    an evaluation in the ℓ1 window leaves sparsify.penalty at 0."""
    x = torch.randn(2, 8)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), recipe("l1-prune", l1=0.5, prune_at=0.5, begin=0, end=20),
                          example_inputs=x)
    m.eval()
    m(x)
    m.train()
    with torch.no_grad():
        m(x)
    assert float(sparsify.penalty(m)) == 0.0
    m(x)
    assert float(sparsify.penalty(m).detach()) > 0


def test_l1_prune_checkpoint_inside_the_l1_window_resumes_with_the_penalty_on():
    """A checkpoint saved while the ℓ1 term is on loads with it on: the first training forward
    after the load records l1·Σ|W| (the λ in force is state, docs/methods/dual.md)."""
    x = torch.randn(2, 8)
    rec = recipe("l1-prune", l1=0.5, sparsity=0.5, prune_at=0.5, begin=2, end=20)
    done = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), rec, example_inputs=x)
    for _ in range(3):
        sparsify.step(done)
    resumed = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), rec, example_inputs=x)
    resumed(x)
    assert float(sparsify.penalty(resumed)) == 0.0  # step 0: before begin
    resumed.load_state_dict(done.state_dict())
    resumed(x)
    expected = 0.5 * float(only(resumed, L1PruneMixin).weight.detach().abs().sum())
    assert abs(float(sparsify.penalty(resumed).detach()) - expected) < 1e-5 * expected


# ---------------------------------------------------------------------------------------------
# N:M
# ---------------------------------------------------------------------------------------------

def test_nm_target_switches_on_at_the_begin_step():
    """From begin on the masks apply (docs/methods/nm.md): at step begin the report's target is
    1 − n/m, as the achieved sparsity; one step before it is 0."""
    rec = recipe("nm", n=2, m=4, begin=3)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), rec, example_inputs=torch.randn(1, 8))
    sparsify.step(m)
    sparsify.step(m)
    (row,) = sparsify.report(m).layers
    assert (row.target, row.achieved) == (0.0, 0.0)
    assert sparsify.step(m) == 3
    (row,) = sparsify.report(m).layers
    assert (row.target, row.achieved) == (0.5, 0.5)


def test_nm_gradients_under_torch_func_follow_the_fixed_flag():
    """Under torch.func transforms (per-sample gradients) the N:M gradient is straight-through
    while the masks move and the hard mask's once they are fixed (docs/methods/nm.md), as in eager."""
    from torch.func import functional_call, grad
    torch.manual_seed(0)
    rec = recipe("nm", n=2, m=4, begin=0, fix=2)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), rec, example_inputs=torch.randn(1, 8))
    layer = only(m, NMMixin)
    x = torch.randn(3, 8)

    def weight_grad():
        params = {k: v.detach() for k, v in layer.named_parameters()}
        return grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)["weight"]

    def eager_grad():
        layer.zero_grad()
        layer(x).square().sum().backward()
        return layer.weight.grad.clone()

    moving = weight_grad()
    assert bool((moving[~layer.mask] != 0).all())  # straight-through: pruned weights get gradient
    assert torch.allclose(moving, eager_grad())
    sparsify.step(m)
    sparsify.step(m)
    assert bool(layer.fixed)
    fixed = weight_grad()
    assert bool((fixed[~layer.mask] == 0).all()) and bool((fixed[layer.mask] != 0).all())
    assert torch.allclose(fixed, eager_grad())


# ---------------------------------------------------------------------------------------------
# semi-structured
# ---------------------------------------------------------------------------------------------

def _semistructured(**params):
    rec = recipe("semi-structured", match="Conv2d", **params)
    return sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), rec,
                             example_inputs=torch.randn(1, 3, 8, 8))


def test_semistructured_keeps_the_first_of_equally_good_maps():
    """The frozen map is the one of the lowest loss (docs/methods/semistructured.md); of two maps
    with the same loss the earlier one is kept, not replaced by a later equal one."""
    from sparsify.methods.semistructured import position_mask
    m = _semistructured(sparsity=0.5, begin=0, end=5, seed=3)
    scores = {}
    for t, loss in zip(range(1, 6), [9.0, 2.0, 1.0, 1.0, 3.0]):  # the loss of step t scores map t − 1
        assert sparsify.step(m, loss=loss) == t
        scores[t] = only_group(m).scores.clone()
    mask = [mod for mod in m.modules() if hasattr(mod, "set_mask")][0].mask
    assert not torch.equal(scores[2], scores[3])
    assert torch.equal(mask, position_mask(scores[2], (8, 8), 0.5))


def test_semistructured_steps_without_a_loss_are_warned():
    """sparsify.step without loss= during the ramp cannot score the applied map: the user is told
    to pass the loss (docs/methods/semistructured.md); with the loss nothing is said."""
    m = _semistructured(sparsity=0.5, begin=0, end=5)
    sparsify.step(m)  # step 1: the first map is drawn (none was applied yet)
    assert any("semi-structured got no loss" in w for w in said(sparsify.step, m))
    m = _semistructured(sparsity=0.5, begin=0, end=5)
    assert not any("no loss" in w for t in range(3) for w in said(sparsify.step, m, loss=1.0))


def test_semistructured_at_sparsity_zero_says_nothing_about_unmasked_maps():
    """At sparsity 0 nothing is masked by design: no warning that maps round to no masked position
    (said only when a sparsity > 0 rounds to 0 on a small map)."""
    rec = recipe("semi-structured", match="Conv2d", sparsity=0.0, begin=0, end=2)
    _, messages = warned(sparsify.sparsify, nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), rec,
                         example_inputs=torch.randn(1, 3, 8, 8))
    assert not any("no output position" in w for w in messages), messages


def test_semistructured_checkpoint_before_the_ramp_loads_masks_that_mask_nothing():
    """A checkpoint saved before the ramp holds all-ones masks: loaded, they stay the identity
    (docs: PositionMask is off while its mask has no zero), so the model still runs at another
    resolution, as the model that saved it does."""
    rec = recipe("semi-structured", match="Conv2d", sparsity=0.5, begin=5, end=10)
    x = torch.randn(1, 3, 8, 8)
    saved = sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), rec, example_inputs=x)
    sparsify.step(saved)
    resumed = sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), rec, example_inputs=x)
    resumed.load_state_dict(saved.state_dict())
    for m in (saved, resumed):
        assert m(torch.randn(1, 3, 12, 12)).shape == (1, 4, 12, 12)


def test_semistructured_leaves_1x1_convs_unmasked_by_default():
    """A rule that does not set skip_1x1 leaves 1x1 convs unmasked, as the official example does
    (docs/methods/semistructured.md): one mask, after the 3x3 conv."""
    from sparsify.methods.semistructured import PositionMask
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    m, messages = warned(sparsify.sparsify, net, recipe("semi-structured", match="Conv2d", sparsity=0.5, begin=0, end=2),
                         example_inputs=torch.randn(1, 3, 8, 8))
    assert [mod.layer for mod in m.modules() if isinstance(mod, PositionMask)] == ["0"]
    assert any("1x1 conv (skip_1x1)" in w for w in messages)  # the dense layer is said, with why


# ---------------------------------------------------------------------------------------------
# activation regularizers
# ---------------------------------------------------------------------------------------------

def test_tl1_checkpoint_past_end_resumes_without_a_penalty():
    """A checkpoint saved after the penalty's end loads switched off: the first training forward
    after the load records nothing (the active flag is state, docs/methods/tl1.md)."""
    x = torch.randn(2, 4)
    rec = {"version": 1, "rules": [{"match": {"type": "ReLU"}, "method": "tl1", "params": {"begin": 0, "end": 2}}]}
    done = sparsify.sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), rec, example_inputs=x)
    for _ in range(3):
        sparsify.step(done)
    resumed = sparsify.sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), rec, example_inputs=x)
    resumed.load_state_dict(done.state_dict())
    resumed(x)
    assert sparsify.penalty(resumed) == 0.0
