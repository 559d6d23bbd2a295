"""Cached effective weights (ST-3, GMP): the forward equals the uncached definition, values and
gradients, and every way of changing the weight or the state invalidates the cache."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsify
from sparsify.core.buffers import eager
from sparsify.core.layers import SparseWeightMixin
from sparsify.methods.magnitude import MagnitudeMixin
from sparsify.methods.st3 import ST3Mixin, _StraightThrough, st3_effective_weight, st3_scale

from loops import run_steps

X = torch.randn(2, 4, 8, 8)
Y = torch.tensor([1, 3])


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))


def build(recipe, seed=0, **kw):
    kw = {"begin": 0, "end": 0, "fix": None if recipe.startswith("st3") else 10 ** 6, "sparsity": 0.7, **kw}
    return sparsify.sparsify(net(seed), recipe, example_inputs=X, **kw)


def train(m, steps=2, lr=0.05):
    run_steps(m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), [(X, Y)] * steps)


def layers(m):
    return [mod for mod in m.modules() if isinstance(mod, SparseWeightMixin)]


def st3_reference(layer) -> torch.Tensor:
    """docs/methods/st3.md from the layer's buffers, without any cache."""
    if bool(layer.fixed):
        return layer.weight.detach() * layer.mask
    if float(layer.tau) <= 0:
        return layer.weight.detach()
    return st3_effective_weight(layer.weight.detach(), float(layer.tau), layer.mask, layer.scale)


def test_st3_cached_weight_mask_and_scale_equal_the_definition():
    for recipe in ("st3", "st3-sigma"):
        m = build(recipe)
        train(m)
        for lay in layers(m):
            assert lay.cached("st3", *lay._sources()) is not None, "the forward reuses the update's W_eff"
            a = lay.weight.detach().abs()
            assert torch.equal(lay.mask, a > lay.tau)
            assert torch.equal(lay.scale, st3_scale(lay.weight, lay.mask))
            assert torch.equal(lay.effective_weight(), st3_reference(lay))


@pytest.mark.parametrize("recipe", ["st3", "gmp", "st3-fixed"])
def test_cached_forward_and_gradients_equal_the_uncached_computation(recipe):
    m = build("st3", fix=1) if recipe == "st3-fixed" else build(recipe)
    train(m)
    ref = copy.deepcopy(m)  # a copy has no cache: its first forward is computed from scratch
    for lay, rlay in zip(layers(m), layers(ref)):
        # the reference forward, written out: straight-through (ST-3) or W ⊙ M (GMP, fixed ST-3)
        if isinstance(rlay, ST3Mixin) and not bool(rlay.fixed):
            rlay.forward = (lambda l: lambda x: l.forward_with(x, _StraightThrough.apply(l.weight, st3_reference(l))))(rlay)
        else:
            rlay.forward = (lambda l: lambda x: l.forward_with(x, l.weight * l.mask))(rlay)
    for model in (m, ref):
        model.zero_grad()
        F.cross_entropy(model(X), Y).backward()
    assert torch.equal(m(X), ref(X))
    for lay, rlay in zip(layers(m), layers(ref)):
        assert torch.equal(lay.weight.grad, rlay.weight.grad)
        if recipe != "st3":
            assert bool((lay.weight.grad[~lay.mask] == 0).all())


def test_in_place_weight_change_invalidates():
    m = build("st3")
    train(m)
    lay = layers(m)[1]
    before = lay.effective_weight().detach().clone()
    with torch.no_grad():
        lay.weight.mul_(1.5)
    after = lay.effective_weight().detach()
    assert not torch.equal(after, before)
    assert torch.equal(after, st3_reference(lay))  # the definition with the (now stale) mask


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_load_state_dict_invalidates(recipe):
    a, b = build(recipe, seed=0), build(recipe, seed=1)
    train(a)
    train(b, steps=3)
    y_a = a(X)  # fills a's caches
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(X), b(X))
    assert not torch.equal(a(X), y_a)


def test_to_dtype_and_back_invalidates_and_drops_scratch():
    m = build("st3")
    train(m)
    lay = layers(m)[0]
    m.double()
    assert lay.effective_weight().dtype == torch.float64
    assert torch.equal(lay.effective_weight(), st3_reference(lay))  # computed in float64
    with torch.no_grad():
        lay.weight.mul_(2.0)
    m.float()
    assert torch.equal(lay.effective_weight(), st3_reference(lay))
    train(m)  # the update allocates fresh float32 scratch tensors
    assert lay.scratch("st3", lay.weight).dtype == torch.float32
    assert torch.equal(lay.effective_weight(), st3_reference(lay))


def test_deepcopy_has_its_own_cache():
    m = build("gmp")
    train(m)
    c = copy.deepcopy(m)
    assert torch.equal(c(X), m(X))
    with torch.no_grad():
        layers(c)[0].weight.mul_(3.0)
    assert not torch.equal(c(X), m(X))
    assert torch.equal(layers(m)[0].effective_weight(), layers(m)[0].weight * layers(m)[0].mask)


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_sparsify_step_refreshes_after_writes_the_version_counter_misses(recipe):
    m = build(recipe)
    train(m)
    lay = layers(m)[0]
    lay.effective_weight()
    lay.weight.data.mul_(0.5)  # .data: no version bump (as some fused optimizers write)
    sparsify.step(m)
    if isinstance(lay, ST3Mixin):
        assert torch.equal(lay.mask, lay.weight.detach().abs() > lay.tau)
        assert torch.equal(lay.effective_weight(), st3_reference(lay))
    else:
        assert torch.equal(lay.effective_weight(), lay.weight * lay.mask)


def test_deployed_weight_is_a_copy():
    for recipe in ("st3", "gmp"):
        m = build(recipe)
        train(m)
        lay = layers(m)[1]
        w = lay.deployed_weight()
        saved = w.clone()
        train(m, lr=0.5)
        assert torch.equal(w, saved), recipe
        assert not torch.equal(lay.deployed_weight(), saved)


def test_inference_mode_then_training():
    m = build("gmp")
    train(m)
    with torch.inference_mode():
        y = m(X)
    assert torch.equal(y, m(X))
    train(m)  # nothing created under inference mode is reused by autograd


class _Spy(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_only_when_nothing_traces():
    assert eager()
    with torch.device("cpu"):
        assert eager()
    with _Spy():
        assert not eager()
    m = build("gmp")
    train(m)
    lay = layers(m)[0]
    lay.drop_caches()
    with _Spy():
        lay.effective_weight()
    assert lay.cached("masked", lay.weight, lay.mask) is None, "nothing is cached while a mode traces"


def test_resnet18_layers_use_the_cache():
    import torchvision
    m = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "st3", begin=0, end=0, fix=None,
                          example_inputs=torch.zeros(1, 3, 32, 32))
    sparsify.step(m)
    lays = layers(m)
    assert len(lays) == 21
    assert all(lay.cached("st3", *lay._sources()) is not None for lay in lays)
    zeros = sum(int((lay.effective_weight() == 0).sum()) for lay in lays)
    n = sum(lay.weight.numel() for lay in lays)
    assert zeros == int((n - 1) * 0.9) + 1
