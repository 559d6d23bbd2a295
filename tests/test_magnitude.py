"""GMP (magnitude pruning): hard masks, cubic schedule, global vs per-layer, blocks, fix."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsify
from sparsify.methods.magnitude import MagnitudeMixin, block_scores
from sparsify.prepare.recipe import RecipeError
from sparsify.core.threshold import pruned_count

from loops import run_steps


def small_cnn():
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))


X = torch.randn(2, 4, 8, 8)


def make(**kw):
    return sparsify.sparsify(small_cnn(), "gmp", example_inputs=X, **kw)


def layers(m):
    return [mod for mod in m.modules() if isinstance(mod, MagnitudeMixin)]


def run(m, steps, lr=0.05):
    run_steps(m, torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=lr, momentum=0.9), [(X, torch.arange(2))] * steps)


def test_global_one_shot_prunes_the_exact_count_of_smallest_magnitudes():
    m = make(begin=0, end=0, sparsity=0.7)
    ls = layers(m)
    mags = torch.cat([l.weight.detach().abs().reshape(-1) for l in ls])
    n = mags.numel()
    zeros = sum(int((l.effective_weight() == 0).sum()) for l in ls)
    assert zeros == pruned_count(n, 0.7)
    kept_min = min(float(l.weight.detach().abs()[l.mask].min()) for l in ls)
    pruned_max = max(float(l.weight.detach().abs()[~l.mask].max()) for l in ls)
    assert pruned_max < kept_min  # one global threshold, not per layer
    sizes = {l.weight.numel(): float((~l.mask).float().mean()) for l in ls}
    assert max(sizes.values()) - min(sizes.values()) > 0.05  # layers end up at different sparsities



class _Traced(TorchDispatchMode):
    """A pass-through dispatch mode: the layer's non-eager path (no scratch buffers) computes the mask."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("mags, sparsity, tau, pruned", [
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 0.5, 5, 5),   # (N-1)·r = 4: the threshold is exactly the 5th smallest |W|
    ([0, 0, 0, 0, 3, 5, 6, 7, 9], 0.25, 0, 4),  # exact zeros already there: τ = 0, all 4 tied zeros pruned
])
def test_global_threshold_prunes_the_weights_equal_to_it(mags, sparsity, tau, pruned, traced):
    # the mask is |W| > τ (strict, as ST-3's): a weight equal to the threshold is pruned
    w = torch.tensor(mags, dtype=torch.float32).reshape(3, 3) * 0.125 * torch.tensor([1., -1., 1.])
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = sparsify.sparsify(nn.Sequential(lin), "gmp", begin=1, end=1, sparsity=sparsity, min_density=0,
                          example_inputs=torch.randn(1, 3))
    (layer,) = layers(m)
    assert bool(layer.mask.all())  # dense until the one-shot step 1
    with _Traced() if traced else contextlib.nullcontext():
        sparsify.step(m)
    expected = w.abs() > tau * 0.125
    assert torch.equal(layer.mask, expected)
    assert int((~layer.mask).sum()) == pruned >= pruned_count(9, sparsity)

def test_layer_scope_prunes_every_layer_to_the_target():
    m = make(begin=0, end=0, sparsity=0.5, scope="layer")
    for l in layers(m):
        assert int((~l.mask).sum()) == pruned_count(l.weight.numel(), 0.5)


def test_hard_mask_forward_and_zero_gradient_for_pruned_weights():
    m = make(begin=0, end=0, sparsity=0.6)
    l = layers(m)[1]
    assert torch.equal(l.effective_weight(), l.weight * l.mask)
    m(X).sum().backward()
    assert bool((l.weight.grad[~l.mask] == 0).all())
    assert bool((l.weight.grad[l.mask] != 0).any())


def test_cubic_schedule_then_frozen_mask():
    m = make(begin=2, end=10, sparsity=0.8)
    group = next(iter(sparsify.api.find_state(m).groups.values()))
    seen = {}
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.05, momentum=0.9)
    for t in range(1, 14):
        run_steps(m, opt, [(X, torch.arange(2))])
        masks = [l.mask.clone() for l in layers(m)]
        seen[t] = (1 - sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks), masks)
    assert seen[1][0] == 0.0  # before begin: dense
    assert group.target(6) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # midpoint 0.875 * final
    assert seen[6][0] == pytest.approx(group.target(6), abs=2e-3)
    assert seen[10][0] == pytest.approx(0.8, abs=2e-3)
    assert all(torch.equal(a, b) for a, b in zip(seen[10][1], seen[13][1]))  # fix defaults to end
    assert sparsify.report(m).groups["rule0_magnitude"]["phase"] == "fixed"


def test_masks_keep_moving_until_an_explicit_fix():
    m = make(begin=0, end=2, fix=8, sparsity=0.5)
    run(m, 3)
    before = [l.mask.clone() for l in layers(m)]
    run(m, 5, lr=0.5)  # big steps reshuffle magnitudes
    after = [l.mask.clone() for l in layers(m)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    run(m, 3, lr=0.5)
    assert all(torch.equal(a, l.mask) for a, l in zip(after, layers(m)))


def test_block_pruning_zeroes_whole_blocks():
    m = make(begin=0, end=0, sparsity=0.5, block=[2, 4])
    conv2 = layers(m)[1]  # 16 x 72
    mask = conv2.mask.reshape(8, 2, 18, 4)  # (out blocks, bo, in blocks, bi)
    per_block = mask.sum(dim=(1, 3))
    assert bool(((per_block == 0) | (per_block == 8)).all())
    assert 0.3 < float((per_block == 0).float().mean()) < 0.7
    scores = block_scores(conv2.weight, (2, 4))
    assert float(scores[per_block == 0].max()) <= float(scores[per_block == 8].min())



def test_blocks_are_ranked_by_their_mean_magnitude_not_their_largest():
    # blocks [1, 2] of a 2 x 4 weight: A and B hold one big weight each, C and D medium ones
    w = torch.tensor([[0.8, -0.05, 0.5, -0.5],      # A = |.8, .05| (mean .425), C = |.5, .5| (mean .5)
                      [-0.6, 0.05, 0.55, 0.55]])    # B = |.6, .05| (mean .325), D = |.55, .55| (mean .55)
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = sparsify.sparsify(nn.Sequential(lin), "gmp", begin=0, end=0, sparsity=0.5, block=[1, 2], min_density=0,
                          example_inputs=torch.randn(1, 4))
    (layer,) = layers(m)
    means = torch.tensor([[(0.8 + 0.05) / 2, (0.5 + 0.5) / 2], [(0.6 + 0.05) / 2, (0.55 + 0.55) / 2]])
    assert pruned_count(4, 0.5) == 2
    keep = means > means.flatten().kthvalue(2).values  # the two smallest means (A, B) pruned
    assert keep.tolist() == [[False, True], [False, True]]  # by their largest |W| A and B would stay
    assert torch.equal(layer.mask, keep.repeat_interleave(2, 1))


def test_a_block_whose_mean_equals_the_threshold_is_pruned():
    """The block path keeps blocks strictly above τ, as the elementwise one: 5 blocks with means 1..5
    at sparsity 0.25 put τ exactly on the second mean ((5 - 1) * 0.25 = 1), so blocks 1 and 2 go."""
    lin = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0]]))
    m = sparsify.sparsify(nn.Sequential(lin), "gmp", begin=0, end=0, sparsity=0.25, block=[1, 2], min_density=0,
                          scope="layer", example_inputs=torch.randn(1, 10))
    (layer,) = layers(m)
    assert pruned_count(5, 0.25) == 2
    assert layer.mask.tolist() == [[False] * 4 + [True] * 6]


def test_block_that_does_not_divide_leaves_the_layer_dense_with_a_reason():
    p = sparsify.plan(small_cnn(), "gmp", block=[1, 8], example_inputs=X)
    dense = {e.name: e.reason for e in p.dense}
    assert "does not divide" in dense["0"]  # 4*3*3 = 36 inputs: not a multiple of 8
    assert {e.name for e in p.rewritten} == {"2", "6"}  # 8*3*3 = 72 and 16 inputs
    assert len([e for e in p.entries if e.name == "0"]) == 1


def test_bad_params_are_reported_with_their_path():
    with pytest.raises(RecipeError, match="scope"):
        make(scope="model")
    with pytest.raises(RecipeError, match="block"):
        make(block=[0, 4])
    with pytest.raises(ValueError, match="fix"):
        make(begin=0, end=10, fix=5)


def test_builtin_recipe_reaches_its_target_and_finalizes():
    m = sparsify.sparsify(small_cnn(), "gmp", total_steps=10, example_inputs=X)
    run(m, 10)
    rep = sparsify.report(m)
    assert rep.totals["weight_sparsity"] == pytest.approx(0.9, abs=2e-3)
    final = sparsify.finalize(m)
    m.eval()
    assert torch.allclose(final(X), m(X), atol=1e-6)


def _masks(m):
    return [l.mask.clone() for l in layers(m)]


def _mask_change_steps(m, steps: int) -> list[int]:
    """The steps (1..steps) of a training run after which some mask differs from the step before."""
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.05, momentum=0.9)
    changed_at, before = [], _masks(m)
    for step in range(1, steps + 1):
        F.cross_entropy(m(X), torch.arange(2)).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(m)
        now = _masks(m)
        if any(not torch.equal(a, b) for a, b in zip(before, now)):
            changed_at.append(step)
        before = now
    return changed_at


@pytest.mark.parametrize("frequency, ramp, interval", [(None, (0, 6400), 100), (None, (0, 320), 10), (7, (0, 6400), 7)])
def test_masks_change_only_every_pruning_interval(frequency, ramp, interval):
    # Zhu & Gupta's Δt: 100 steps by default, fewer in a short ramp (>= 32 updates), or as given
    kw = {} if frequency is None else {"frequency": frequency}
    m = make(begin=ramp[0], end=ramp[1], sparsity=0.9, **kw)
    changed_at = _mask_change_steps(m, 2 * interval + 1)
    assert changed_at and all(s % interval == 0 for s in changed_at), changed_at
    assert interval in changed_at


def test_the_fix_step_selects_the_frozen_mask_from_its_own_weights():
    # fix later than end and off the pruning interval: the mask frozen at fix is selected from the
    # weights of that step (one last re-selection), not kept from the last interval step
    m = make(begin=0, end=0, fix=7, frequency=5, sparsity=0.5)
    run(m, 7, lr=0.5)
    ls = layers(m)
    mags = torch.cat([l.weight.detach().abs().reshape(-1) for l in ls])
    kth = torch.sort(mags).values[pruned_count(mags.numel(), 0.5) - 1]  # the largest pruned magnitude
    for l in ls:
        assert torch.equal(l.mask, l.weight.detach().abs() > kth)
    frozen = _masks(m)
    run(m, 3, lr=0.5)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _masks(m)))


def test_reported_phase_changes_at_begin_end_and_fix():
    m = make(begin=2, end=5, fix=8, sparsity=0.5)
    (g,) = sparsify.api.find_state(m).groups.values()
    phases = {t: g.describe(t)["phase"] for t in (1, 2, 4, 5, 7, 8, 9)}
    assert phases == {1: "dense", 2: "ramp", 4: "ramp", 5: "hold", 7: "hold", 8: "fixed", 9: "fixed"}


def test_pruning_steps_count_from_begin():
    # the mask is re-selected every `frequency` steps counted from begin (13, 23, ...), not at
    # the multiples of frequency
    m = make(begin=3, end=103, frequency=10, sparsity=0.9)
    assert _mask_change_steps(m, 34) == [13, 23, 33]


def test_frequency_must_be_null_or_a_positive_whole_number():
    with pytest.raises(RecipeError, match="frequency"):
        make(frequency=0)
    with pytest.raises(RecipeError, match="frequency"):
        make(frequency=2.5)


def test_gmp_keeps_two_weight_sized_work_tensors_per_layer():
    # |W| for the threshold goes into the (stale) W ⊙ M buffer: only W ⊙ M and the float mask stay
    from sparsify.core.buffers import layer_buffers
    m = make(begin=0, end=0, sparsity=0.5)
    run(m, 2)
    for layer in layers(m):
        assert layer_buffers(layer).names() == ["mask_f", "masked"]
