"""ST-3 / ST-3σ against the oracles of docs/methods/st3.md."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.methods.st3 import ST3_CLASSES, sigma_of, st3_effective_weight, st3_scale
from sparsify.core.schedules import cubic
from sparsify.core.state import find_state
from sparsify.core.threshold import pruned_count


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 10))


X = None


def inputs():
    return torch.randn(2, 3, 10, 10)


def st3_layers(model):
    return [m for m in model.modules() if isinstance(m, sparsify.methods.st3.ST3Mixin)]


def zeros_of(model) -> tuple[int, int]:
    """(zeros, total) over the effective weights of every ST-3 layer."""
    ws = [m.effective_weight().detach() for m in st3_layers(model)]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def group_of(model):
    (g,) = find_state(model).groups.values()
    return g


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_nonpositive_tau_is_bitwise_plain_conv(tau):
    dense = nn.Conv2d(4, 6, 3, padding=1)
    layer = ST3_CLASSES[nn.Conv2d].from_dense(dense)
    layer.tau.fill_(tau)
    x1 = torch.randn(2, 4, 7, 7, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y_ref = F.conv2d(x1, dense.weight, dense.bias, padding=1)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    ref_wgrad, ref_bgrad = dense.weight.grad.clone(), dense.bias.grad.clone()
    dense.weight.grad = dense.bias.grad = None  # the layer shares the parameters
    y = layer(x2)
    (y * g).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(layer.weight.grad, ref_wgrad)
    assert torch.equal(layer.bias.grad, ref_bgrad)
    assert torch.equal(x2.grad, x1.grad)


def test_worked_example():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.05, 0.3, -0.4]]))
    layer = ST3_CLASSES[nn.Linear].from_dense(lin)
    layer.set_threshold(0.1)
    assert layer.mask.tolist() == [[True, False, True, True]]
    rho = (1.2 / 4 + 1e-6) / (1.25 / 4 + 1e-6)
    assert rho == pytest.approx(0.96, abs=1e-5)
    c = 1.01 / (rho + 0.01)
    assert float(layer.scale) == pytest.approx(c, rel=1e-6)
    assert c == pytest.approx(1.01 / 0.97, rel=1e-5)
    expected = torch.tensor([[0.4, 0.0, 0.2, -0.3]]) * c
    torch.testing.assert_close(layer.effective_weight().detach(), expected, rtol=1e-6, atol=1e-7)
    # the pure functions agree with the layer
    w = lin.weight.detach()
    torch.testing.assert_close(st3_effective_weight(w, 0.1, w.abs() > 0.1, st3_scale(w, w.abs() > 0.1)), expected,
                               rtol=1e-6, atol=1e-7)


def test_mask_is_strict():
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.1, 0.2]]))
    layer = ST3_CLASSES[nn.Linear].from_dense(lin)
    layer.set_threshold(0.1)
    assert layer.mask.tolist() == [[False, False, True]]


@pytest.mark.parametrize("cls", [nn.Linear, nn.Conv1d, nn.Conv2d])
def test_straight_through_gradient(cls):
    dense = {nn.Linear: lambda: nn.Linear(12, 5), nn.Conv1d: lambda: nn.Conv1d(3, 5, 3),
             nn.Conv2d: lambda: nn.Conv2d(3, 5, 3)}[cls]()
    x = {nn.Linear: (4, 12), nn.Conv1d: (4, 3, 9), nn.Conv2d: (4, 3, 6, 6)}[cls]
    x = torch.randn(x)
    layer = ST3_CLASSES[cls].from_dense(dense)
    tau = float(layer.weight.detach().abs().median())
    layer.set_threshold(tau)
    pruned = ~layer.mask
    assert pruned.any()

    y = layer(x)
    target = torch.randn_like(y)
    ((y - target) ** 2).sum().backward()

    w_eff = layer.effective_weight().detach().requires_grad_()
    y_leaf = layer.forward_with(x, w_eff)
    torch.testing.assert_close(y_leaf, y.detach(), rtol=0, atol=0)
    ((y_leaf - target) ** 2).sum().backward()

    torch.testing.assert_close(layer.weight.grad, w_eff.grad, rtol=0, atol=0)
    assert (layer.weight.grad[pruned] != 0).any(), "pruned weights must receive gradient"


def test_train_and_eval_forward_identical():
    m = sparsify.sparsify(small_net(), "st3", sparsity=0.7, begin=0, end=0, fix=None, example_inputs=inputs())
    x = inputs()
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    assert torch.equal(y_train, y_eval)


def test_bias_stays_dense_and_unpruned():
    net = small_net()
    with torch.no_grad():
        for mod in net.modules():
            if getattr(mod, "bias", None) is not None:
                mod.bias.fill_(1e-4)  # far below any threshold
    m = sparsify.sparsify(net, "st3", sparsity=0.9, begin=0, end=0, fix=None, example_inputs=inputs())
    for layer in st3_layers(m):
        assert float(layer.tau) > 1e-4
        assert bool((layer.bias == 1e-4).all())


# ---------------------------------------------------------------------------------------------
# the threshold
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [False, True])
@pytest.mark.parametrize("r", [0.1, 0.5, 0.77, 0.9, 0.99])
def test_exact_pruned_count(r, sigma):
    m = sparsify.sparsify(small_net(), "st3", sparsity=r, begin=0, end=0, fix=None, sigma=sigma,
                          example_inputs=inputs())
    zeros, n = zeros_of(m)
    assert zeros == pruned_count(n, r) == int(np.floor((n - 1) * r)) + 1


def test_global_threshold_is_numpy_quantile_and_shared():
    m = sparsify.sparsify(small_net(), "st3", sparsity=0.6, begin=0, end=0, fix=None, example_inputs=inputs())
    layers = st3_layers(m)
    mags = np.concatenate([lay.weight.detach().abs().reshape(-1).numpy() for lay in layers])
    tau = float(group_of(m).tau)
    assert tau == pytest.approx(float(np.quantile(mags, 0.6)), rel=1e-6)
    for lay in layers:
        assert float(lay.tau) == pytest.approx(tau, rel=1e-6)
        assert torch.equal(lay.mask, lay.weight.detach().abs() > lay.tau)


def test_sigma_values():
    assert sigma_of(torch.zeros(64, 32, 3, 3)) == pytest.approx(1 / np.sqrt(64 + 32 + 3 + 3))
    assert sigma_of(torch.zeros(10, 144)) == pytest.approx(1 / np.sqrt(154))
    assert sigma_of(torch.zeros(5, 3, 7)) == pytest.approx(1 / np.sqrt(15))


def test_sigma_per_layer_threshold():
    m = sparsify.sparsify(small_net(), "st3-sigma", sparsity=0.8, begin=0, end=0, fix=None,
                          example_inputs=inputs())
    layers = st3_layers(m)
    sigmas = [sigma_of(lay.weight) for lay in layers]
    scaled = np.concatenate([lay.weight.detach().abs().reshape(-1).numpy() / s for lay, s in zip(layers, sigmas)])
    tau = float(group_of(m).tau)
    assert tau == pytest.approx(float(np.quantile(scaled.astype(np.float32), 0.8)), rel=1e-5)
    taus = [float(lay.tau) for lay in layers]
    for lay_tau, s in zip(taus, sigmas):
        assert lay_tau == pytest.approx(tau * s, rel=1e-6)
    assert len(set(taus)) == len(taus), "differently shaped layers get different thresholds"


def test_thresholds_follow_the_weights_every_step():
    m = sparsify.sparsify(small_net(), "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=inputs())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(3):
        before = [lay.mask.clone() for lay in st3_layers(m)]
        F.cross_entropy(m(inputs()), torch.tensor([1, 2])).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(m)
        layers = st3_layers(m)
        mags = torch.cat([lay.weight.detach().abs().reshape(-1) for lay in layers])
        tau = float(group_of(m).tau)
        assert tau == pytest.approx(float(np.quantile(mags.numpy(), 0.5)), rel=1e-6)
        for lay in layers:
            assert torch.equal(lay.mask, lay.weight.detach().abs() > tau)
    assert any(not torch.equal(a, lay.mask) for a, lay in zip(before, st3_layers(m))), "masks never moved"


# ---------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------

def test_cubic_schedule_points():
    s = 0.9
    assert cubic(4, 10, 30, s) == 0.0
    assert cubic(10, 10, 30, s) == 0.0
    assert cubic(20, 10, 30, s) == pytest.approx(0.875 * s)
    assert cubic(30, 10, 30, s) == s
    assert cubic(31, 10, 30, s) == s


def test_schedule_drives_the_model():
    s = 0.8
    m = sparsify.sparsify(small_net(), "st3", sparsity=s, begin=10, end=30, fix=None, example_inputs=inputs())
    g = group_of(m)
    seen = {}
    for t in range(1, 32):
        assert sparsify.step(m) == t
        zeros, n = zeros_of(m)
        seen[t] = zeros
        assert g.target(t) == pytest.approx(cubic(t, 10, 30, s))
    assert seen[5] == 0 and seen[10] == 0, "dense before and at begin"
    assert seen[20] == pruned_count(n, 0.875 * s)
    assert seen[30] == pruned_count(n, s)
    assert g.target(30) == s


def test_fraction_times_resolve_against_total_steps():
    m = sparsify.sparsify(small_net(), "st3", total_steps=200, example_inputs=inputs())
    g = group_of(m)
    assert (g.begin, g.end, g.fix_at) == (10, 100, 180)  # st3.json: 0.05, 0.5, 0.9


# ---------------------------------------------------------------------------------------------
# the fix phase
# ---------------------------------------------------------------------------------------------

def official_fix(weights: list[torch.Tensor], ratio: float, sigma: bool = False):
    """The official fix step (docs/methods/st3.md; stthree ``_change_model(..., fix_model=True)``), in
    plain torch: τ at the final ratio from the CURRENT weights (numpy's linear quantile over
    ``|W|/σ_l``), per layer M = |W| > τ·σ_l, c = 1.01 / (ρ + 0.01), and only then W ← W_eff.
    Returns the baked weights and the masks."""
    sig = [1 / np.sqrt(sum(w.shape)) if sigma else 1.0 for w in weights]
    scaled = torch.cat([(w.abs().double() / s).float().reshape(-1) for w, s in zip(weights, sig)]).double()
    v, _ = torch.sort(scaled)
    pos = (len(v) - 1) * ratio
    lo = int(np.floor(pos))
    tau = float(v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo))
    baked, masks = [], []
    for w, s in zip(weights, sig):
        t = float(torch.tensor(tau * s, dtype=torch.float32))  # the layer stores τ_l in float32
        mask = (w.abs() > t).float()
        dims = tuple(range(1, w.dim()))
        rho = ((w.abs() * mask).mean(dims, keepdim=True) + 1e-6) / (w.abs().mean(dims, keepdim=True) + 1e-6)
        c = 1.01 / (rho + 0.01)
        baked.append(c * (w - torch.sign(w) * t) * mask)
        masks.append(mask.bool())
    return baked, masks


def _train_until_fix(m, fix_at, tamper=None):
    """Train to just before the fix step's ``sparsify.step``; ``tamper`` edits the weights as
    part of that step's optimizer update."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    def train_step():
        F.cross_entropy(m(inputs()), torch.tensor([0, 3])).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(fix_at - 1):
        train_step()
        sparsify.step(m)
    train_step()
    if tamper is not None:
        with torch.no_grad():
            tamper(st3_layers(m))
    return opt, train_step


@pytest.mark.parametrize("sigma", [False, True])
@pytest.mark.parametrize("begin,end,fix", [(0, 2, 4), (0, 10, 4)], ids=["fix-after-end", "fix-before-end"])
def test_fix_step_follows_the_official_order(begin, end, fix, sigma):
    s = 0.7
    m = sparsify.sparsify(small_net(), "st3", sparsity=s, begin=begin, end=end, fix=fix, sigma=sigma,
                          example_inputs=inputs())
    crossed = {}

    def tamper(layers):
        # a kept weight crosses to the other side of zero, below τ, in the fix step's update
        lay = layers[1]
        idx = int(torch.nonzero(lay.mask.reshape(-1))[0])
        w = lay.weight.view(-1)
        w[idx] = -torch.sign(w[idx]) * 1e-4 * float(lay.tau)
        crossed.update(layer=lay, idx=idx)

    opt, train_step = _train_until_fix(m, fix, tamper)
    assert bool(crossed["layer"].mask.view(-1)[crossed["idx"]]), "still in the previous step's mask"
    ref_w, ref_masks = official_fix([lay.weight.detach().clone() for lay in st3_layers(m)], s, sigma)
    x = inputs()
    if end > fix:
        with pytest.warns(UserWarning, match="before the ramp's end"):
            sparsify.step(m)
    else:
        sparsify.step(m)
    layers = st3_layers(m)
    assert all(bool(lay.fixed) for lay in layers)
    for lay, w, mask in zip(layers, ref_w, ref_masks):
        assert torch.equal(lay.mask, mask)
        torch.testing.assert_close(lay.weight.detach(), w, rtol=1e-6, atol=1e-7)
    assert float(crossed["layer"].weight.detach().view(-1)[crossed["idx"]]) == 0.0, "the crossed weight is pruned, not flipped"
    zeros, n = zeros_of(m)
    assert zeros == pruned_count(n, s), "the fix applies the final ratio"
    assert group_of(m).target(fix) == s

    # the output across the fix: the official forward with the recomputed state, then W ⊙ M
    def net_with(ws):
        convs = [F.relu(F.conv2d(x, ws[0], layers[0].bias))]
        convs.append(F.relu(F.conv2d(convs[0], ws[1], layers[1].bias, stride=2)))
        return F.linear(convs[1].flatten(1), ws[2], layers[2].bias)

    with torch.no_grad():
        torch.testing.assert_close(m(x), net_with(ref_w), rtol=1e-5, atol=1e-6)

    F.cross_entropy(m(x), torch.tensor([0, 3])).backward()
    for lay in layers:
        assert bool((lay.weight.grad[~lay.mask] == 0).all())
        assert (lay.weight.grad[lay.mask] != 0).any()
    opt.zero_grad()
    masks = [lay.mask.clone() for lay in layers]
    for _ in range(3):
        train_step()
        sparsify.step(m)
    for lay, mask in zip(st3_layers(m), masks):
        assert torch.equal(lay.mask, mask), "the mask is frozen after the fix"
        assert bool((lay.effective_weight()[~mask] == 0).all())
    assert find_state(m).step == fix + 3


def test_stale_fix_differs_from_the_official_one():
    """The reference is not vacuous: baking the previous step's τ/M/c into the moved weights
    (the order this test guards against) gives other weights."""
    m = sparsify.sparsify(small_net(), "st3", sparsity=0.7, begin=0, end=2, fix=4, example_inputs=inputs())
    _train_until_fix(m, 4)
    layers = st3_layers(m)
    stale = [st3_effective_weight(lay.weight.detach(), float(lay.tau), lay.mask, lay.scale) for lay in layers]
    ref, _ = official_fix([lay.weight.detach().clone() for lay in layers], 0.7)
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(stale, ref))


def test_reported_phase_changes_at_begin_end_and_fix():
    # the report's phase: dense before begin, ramp from begin, hold from end, fixed from fix
    m = sparsify.sparsify(small_net(), "st3", sparsity=0.5, begin=2, end=5, fix=8, example_inputs=inputs())
    phases = {t: group_of(m).describe(t)["phase"] for t in (1, 2, 4, 5, 7, 8)}
    assert phases == {1: "dense", 2: "ramp", 4: "ramp", 5: "hold", 7: "hold", 8: "fixed"}


def test_cubic_with_begin_equal_end_is_a_step():
    # one-shot pruning (begin == end) goes through the same cubic schedule, without a special case
    from sparsify.core.schedules import cubic
    assert cubic(9, 10, 10, 0.9) == 0.0
    assert cubic(10, 10, 10, 0.9) == 0.9
    assert cubic(0, 0, 0, 0.9) == 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_layer_has_one_effective_weight_whichever_path_made_it(dtype):
    # τ just below a number v of the weight's dtype, which τ rounds to: a weight equal to v was
    # outside M where the comparison rounds τ (torch 2.11) but inside softshrink's W_eff, and the
    # formula (a finalized copy's path) gave other bits than set_threshold's cached W_eff
    torch.manual_seed(0)
    v = float(torch.tensor(0.0261).to(dtype))
    tau = v * (1 - 2**-16)
    layer = ST3_CLASSES[nn.Linear].from_dense(nn.Linear(256, 64).to(dtype))  # τ stays a float32 buffer
    with torch.no_grad():
        w = torch.rand(64, 256) * 0.06 - 0.03
        w[:, :8] = v * torch.sign(torch.randn(64, 8))
        layer.weight.copy_(w.to(dtype))
    layer.set_threshold(tau)
    cached = layer.effective_weight().detach()
    assert not bool((cached[~layer.mask] != 0).any())  # W_eff is zero outside M
    # c from the same M: the rows' means of |W| ⊙ M leave out the weights equal to v
    assert torch.allclose(layer.scale.float(), st3_scale(layer.weight, layer.mask).float(), rtol=1e-2)
    definition = st3_effective_weight(layer.weight.detach(), layer._tau(), layer.mask, layer.scale)
    assert torch.equal(cached, definition)
    copy = pickle.loads(pickle.dumps(layer))  # no cached W_eff: computed by the formula
    assert torch.equal(copy.deployed_weight(), cached)
