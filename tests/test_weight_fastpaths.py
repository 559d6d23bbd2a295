"""STR and N:M fast paths (sparsify/methods/str/kernel.py, sparsify/methods/nm/kernel.py): custom
autograd functions, reused weight buffers and the incremental N:M mask give the numbers of the
plain compositions they replace."""
from __future__ import annotations

import copy
import math
import pickle
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.core.buffers import layer_buffers
import sparsify.methods.str.layer as str_mod  # the module whose layers call _fast and _shrink
from sparsify.methods.nm import NMMixin, nm_mask
from sparsify.methods.nm.kernel import _MaskedStraightThrough, _NMWeight
from sparsify.methods.str import STRMixin, soft_threshold, str_weight
from sparsify.methods.str.kernel import _shrink, _SoftThreshold

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([3, 7])


def net(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.shufflenet_v2_x0_5(num_classes=10)


def layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def plain_str(monkeypatch):
    """Make STR layers compute with the plain composition (the reference)."""
    monkeypatch.setattr(str_mod, "_fast", lambda w, t: False)


# ------------------------------------------------------------------------------------------
# STR
# ------------------------------------------------------------------------------------------

SHAPES = [((6, 5, 3, 3), ()), ((6, 5, 3, 3), (6, 1, 1, 1)), ((7, 9), (7, 1)), ((7, 9), ())]


@pytest.mark.parametrize("shape,t_shape", SHAPES)
def test_soft_threshold_gradcheck_in_float64(shape, t_shape):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, dtype=torch.float64, generator=g) * 0.3).requires_grad_()
    t = (torch.rand(t_shape, dtype=torch.float64, generator=g) * 0.3 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(soft_threshold, (w, t))
    assert torch.autograd.gradgradcheck(soft_threshold, (w, t))

    def in_place(w, t):  # the variant a layer's own forward uses
        with torch.no_grad():
            eff = _shrink(w, t)
        return _SoftThreshold.apply(w, t, eff, True, None)

    assert torch.autograd.gradcheck(in_place, (w, t))


@pytest.mark.parametrize("shape,t_shape", SHAPES)
def test_soft_threshold_first_gradients_with_create_graph_equal_the_plain_ones(shape, t_shape):
    # create_graph=True (a gradient penalty) takes the backward's differentiable branch: its
    # values must be those of the plain composition (gradgradcheck alone would accept any
    # self-consistent first derivative)
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(shape, generator=g) * 0.3).requires_grad_()
    t = (torch.rand(t_shape, generator=g) * 0.3 + 0.05).requires_grad_()
    go = torch.randn(shape, generator=g)
    ref = torch.autograd.grad(str_weight(w, t), (w, t), go)
    got = torch.autograd.grad(soft_threshold(w, t), (w, t), go, create_graph=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape,t_shape", SHAPES)
def test_soft_threshold_equals_the_plain_composition_in_float32(shape, t_shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g) * 0.3
    w.view(-1)[:3] = torch.tensor([0.1, -0.1, 0.0])  # on the threshold, and zero
    t = torch.full(t_shape, 0.1)
    grad = torch.randn(shape, generator=g)
    out = {}
    for name, fn in (("fast", soft_threshold), ("plain", str_weight)):
        wi, ti = w.clone().requires_grad_(), t.clone().requires_grad_()
        y = fn(wi, ti)
        y.backward(grad)
        out[name] = (y.detach(), wi.grad, ti.grad)
    (y1, gw1, gt1), (y2, gw2, gt2) = out["fast"], out["plain"]
    assert torch.equal(y1, y2) and torch.equal(gw1, gw2)
    torch.testing.assert_close(gt1, gt2, rtol=1e-5, atol=1e-6)  # a sum in another order


@pytest.mark.parametrize("granularity", ["layer", "channel", "global"])
def test_str_model_forward_and_gradients_equal_the_plain_composition(granularity, monkeypatch):
    fast = sparsify.sparsify(net(), "str", granularity=granularity, s_init=-3.0, example_inputs=X)
    ref = sparsify.sparsify(net(), "str", granularity=granularity, s_init=-3.0, example_inputs=X)
    opt = torch.optim.SGD(sparsify.param_groups(fast, 1e-2), lr=0.05, momentum=0.9)
    for _ in range(2):  # the fast model's buffers are rewritten after the optimizer step
        ref.load_state_dict(fast.state_dict())
        opt.zero_grad(set_to_none=True)
        out_fast = fast(X)
        F.cross_entropy(out_fast, Y).backward()
        with monkeypatch.context() as mp:
            plain_str(mp)
            ref.zero_grad(set_to_none=True)
            out_ref = ref(X)
            F.cross_entropy(out_ref, Y).backward()
        assert torch.equal(out_fast, out_ref)
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            if name.endswith(".s") or name == "s":
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
            else:
                assert torch.equal(a.grad, b.grad), name
        opt.step()
        sparsify.step(fast)
    assert 0 < sparsify.report(fast).totals["weight_sparsity"] < 1


def test_str_buffer_is_not_overwritten_while_a_graph_still_needs_it(monkeypatch):
    layer = layers(sparsify.sparsify(nn.Sequential(nn.Conv2d(4, 6, 3)), "str", s_init=-3.0,
                                     example_inputs=torch.zeros(1, 4, 5, 5)), STRMixin)[0]
    x = torch.randn(2, 4, 5, 5)
    y1 = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # between the forward and its backward (e.g. a second model call)
    y2 = layer(x)
    (y1.square().sum() + y2.sum()).backward()
    w0 = (layer.weight.detach() / 2.0).requires_grad_()
    w1 = layer.weight.detach().clone().requires_grad_()
    t = str_mod.str_threshold(layer.s.detach())
    ref1 = F.conv2d(x, str_weight(w0, t), layer.bias)
    ref2 = F.conv2d(x, str_weight(w1, t), layer.bias)
    assert torch.equal(y1, ref1) and torch.equal(y2, ref2)
    (ref1.square().sum() + ref2.sum()).backward()
    assert torch.equal(layer.weight.grad, w0.grad + w1.grad)


def test_str_eval_forward_reuses_the_effective_weight_until_w_changes():
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), "str", s_init=-3.0, example_inputs=torch.zeros(1, 8))
    layer = layers(m, STRMixin)[0]
    x = torch.randn(3, 8)
    with torch.no_grad(), mock.patch.object(str_mod, "_shrink", wraps=_shrink) as spy:
        a, b = m(x), m(x)
        assert spy.call_count == 1 and torch.equal(a, b)
        layer.weight.add_(0.01)
        c = m(x)
        assert spy.call_count == 2
    assert torch.equal(c, F.linear(x, str_weight(layer.weight, layer.threshold()), layer.bias).detach())


def test_str_buffer_is_reused_once_the_graph_is_gone_and_copies_start_without_it():
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), "str", s_init=-3.0, example_inputs=torch.zeros(1, 8))
    layer = layers(m, STRMixin)[0]
    e1 = layer._forward_weight()
    ptr = e1.data_ptr()
    del e1  # the graph is freed without a backward
    with torch.no_grad():
        layer.weight.add_(0.01)
    e2 = layer._forward_weight()
    assert e2.data_ptr() == ptr  # written into the same buffer
    with torch.no_grad():
        layer.weight.add_(0.01)
    e3 = layer._forward_weight()  # e2's graph is alive: a fresh tensor, e2 keeps its values
    assert e3.data_ptr() != ptr and not torch.equal(e2, e3)
    # retain_graph: two backwards through the same graph
    y = m(torch.randn(2, 8)).sum()
    layer.weight.grad = None
    y.backward(retain_graph=True)
    once = layer.weight.grad.clone()
    y.backward()
    torch.testing.assert_close(layer.weight.grad, 2 * once)
    # copies and pickles hold no buffers, and keep the same state_dict
    assert layer_buffers(layer).names() == ["eff"]
    for other in (layers(copy.deepcopy(m), STRMixin)[0], pickle.loads(pickle.dumps(layer))):
        held = layer_buffers(other, create=False)
        assert held is None or not held.names()
        assert other.state_dict().keys() == layer.state_dict().keys()
        assert torch.equal(other(torch.ones(1, 8)), layer(torch.ones(1, 8)))


def test_str_half_weights_use_the_plain_composition():
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), "str", s_init=-3.0, example_inputs=torch.zeros(1, 8))
    m.half()
    layer = layers(m, STRMixin)[0]
    assert torch.equal(layer._forward_weight(), str_weight(layer.weight, layer.threshold()))


# ------------------------------------------------------------------------------------------
# N:M
# ------------------------------------------------------------------------------------------

def sorted_nm_mask(weight, n, m):
    """The previous implementation: a stable descending sort of every group."""
    a = weight.detach().abs().movedim(1, -1).reshape(-1, m)
    idx = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)
    return keep.reshape(weight.movedim(1, -1).shape).movedim(-1, 1)


NM_CASES = [(shape, n, m) for shape in [(6, 16, 3, 3), (5, 8, 1, 1), (7, 32), (4, 8, 5), (3, 8, 2, 2, 2)]
            for n, m in [(2, 4), (1, 4), (2, 8), (4, 8), (3, 16)] if shape[1] % m == 0]


@pytest.mark.parametrize("shape,n,m", NM_CASES)
def test_nm_mask_equals_the_sorted_reference(shape, n, m):
    g = torch.Generator().manual_seed(sum(shape) + 10 * n + m)
    for w in (torch.randn(shape, generator=g),
              torch.randint(0, 3, shape, generator=g).float() * torch.randn(()).sign(),  # many ties
              torch.zeros(shape)):
        assert torch.equal(nm_mask(w, n, m), sorted_nm_mask(w, n, m))
    if len(shape) == 4 and shape[2] > 1:  # channels_last weight, non-contiguous output
        w = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        out = torch.empty(shape, dtype=torch.bool).contiguous(memory_format=torch.channels_last)
        assert not w.is_contiguous() and not out.is_contiguous()
        assert torch.equal(nm_mask(w, n, m, out=out), sorted_nm_mask(w, n, m))


@pytest.mark.parametrize("straight,decay", [(True, 0.0), (True, 0.3), (False, 0.0)])
def test_nm_weight_gradients_equal_the_plain_function(straight, decay):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 8, 3, 3, generator=g)
    mask = nm_mask(w, 2, 4)
    grad = torch.randn(6, 8, 3, 3, generator=g)
    w_ref = w.clone().requires_grad_()
    y_ref = _MaskedStraightThrough.apply(w_ref, mask, decay) if straight else w_ref * mask
    y_ref.backward(grad)
    for in_place in (False, True):
        wi = w.clone().requires_grad_()
        eff = w * mask.float()
        y = _NMWeight.apply(wi, eff, mask.float(), straight, decay, in_place, None)
        y.backward(grad.clone())
        assert torch.equal(y, y_ref) and torch.equal(wi.grad, w_ref.grad), in_place


def nm_net(seed, **kw):
    return sparsify.sparsify(net(seed), "nm-2-4", example_inputs=X, **kw)


def test_nm_incremental_masks_equal_a_full_recompute_after_every_step():
    m = nm_net(0, begin=0, fix=None)
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.1, momentum=0.9)
    nm_layers = layers(m, NMMixin)
    for step in range(3):
        F.cross_entropy(m(X), Y).backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            nm_layers[3].mask.fill_(True)  # written by someone else: the next update rewrites all
        sparsify.step(m)
        for layer in nm_layers:
            assert torch.equal(layer.mask, sorted_nm_mask(layer.weight, 2, 4))
            assert torch.equal(layer.mask_float(), layer.mask.float())
    assert sparsify.report(m).groups["rule0_nm"]["nm_compliant"] is True


def test_nm_fast_path_trains_bit_identically_to_the_plain_path():
    # a batch of 8 at lr 0.01 trains stably (a batch of 2 at lr 0.1 diverged to NaN within 5 steps,
    # and NaN == NaN is False: the comparison then depended on the torch build)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    runs = []
    for fast in (True, False):
        m = sparsify.sparsify(net(0), "nm-2-4", example_inputs=x, begin=1, fix=3, decay=2e-4)
        opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01, momentum=0.9)
        losses = []
        with mock.patch.object(NMMixin, "_fast", lambda self: fast):
            for _ in range(5):  # dense, straight-through + SR-STE, then fixed
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                losses.append(float(loss))
                opt.step()
                opt.zero_grad()
                sparsify.step(m)
            m.eval()
            runs.append((m.state_dict(), m(x)))
        assert all(math.isfinite(v) and v < 10 for v in losses), f"the run diverged: losses {losses}"
        assert runs[-1][1].abs().max() < 100, "the eval outputs blew up"
        assert any("eff" in layer_buffers(layer).names() for layer in layers(m, NMMixin)) == fast  # the path ran
    (sd_fast, out_fast), (sd_ref, out_ref) = runs
    assert torch.equal(out_fast, out_ref)
    for k, v in sd_fast.items():  # weights, masks, momentum-driven BN statistics
        assert torch.equal(v, sd_ref[k]) if isinstance(v, torch.Tensor) else v == sd_ref[k], k


def test_nm_buffer_is_not_overwritten_while_a_graph_still_needs_it():
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), "nm-2-4", begin=0, fix=None, example_inputs=torch.zeros(1, 8))
    layer = layers(m, NMMixin)[0]
    x = torch.randn(2, 8)
    y1 = m(x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    y2 = m(x)
    mask = layer.mask
    assert torch.equal(y2, F.linear(x, layer.weight * mask, layer.bias))
    assert torch.equal(y1, F.linear(x, layer.weight / -2.0 * mask, layer.bias))
    (y1.sum() + y2.sum()).backward()  # straight-through: each forward's gradient reaches W
    ones = torch.ones(2, 4)
    torch.testing.assert_close(layer.weight.grad, 2 * (ones.t() @ x))
