"""The direct sparse convolution on block-structured weights: groups of 4 (or 2) consecutive output
channels with one non-zero pattern run together (path "direct-b4"), equal to F.conv2d and, bit for
bit, to the per-channel path; mixed layers, threads, saving, and GMP block=[4, 1] end to end."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify.deploy.accelerate import DirectSparseConv2d, accelerate
from sparsify.deploy.compare import outputs_close

from loops import run_steps
from test_direct_conv import _close


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _block_conv(cin, cout, k, stride=1, padding=0, dilation=1, groups=1, sparsity=0.8, bo=4, blocky=None,
                bias=True, seed=0):
    """A conv whose aligned groups of ``bo`` output channels share one random non-zero pattern
    (``blocky``: per group, True for a shared pattern, False for each channel its own)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias).eval()
    w = conv.weight
    keep = torch.rand_like(w) >= sparsity  # unstructured, then groups overwritten with one pattern
    for g in range(cout // bo):
        if blocky is None or blocky[g % len(blocky)]:
            keep[g * bo:(g + 1) * bo] = torch.rand_like(w[0]) >= sparsity
    with torch.no_grad():
        w.mul_(keep)
    return conv


def _check(fast, conv, x):
    with torch.no_grad():
        got = fast(x)
        _close(got, conv(x))
        fast.use_blocks = False  # the per-channel path: same sums in the same order
        assert torch.equal(fast(x), got)
        fast.use_blocks = True


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,hw", [
    (8, 16, 3, 1, 1, 1, 1, (56, 56)),  # many tiles per plane
    (16, 8, 1, 1, 0, 1, 1, (7, 7)),  # read in place, one partial tile: masked loads
    (16, 24, 1, 2, 0, 1, 1, (15, 14)),  # strided 1x1
    (3, 16, 7, 2, 3, 1, 1, (33, 30)),  # ResNet stem
    (8, 8, 3, 2, 1, 1, 1, (14, 14)),
    (8, 8, 3, 1, 2, 2, 1, (13, 11)),  # dilated
    (8, 16, 3, 1, 1, 1, 2, (10, 10)),  # grouped: 8 outputs per group, groups of 4 inside
    (96, 40, 3, 1, 1, 1, 1, (12, 12)),  # several input channel blocks per tile
    (6, 4, 5, 1, 0, 1, 1, (9, 12)),  # no padding, shifted taps
])
@pytest.mark.parametrize("bo", [4, 2])
@pytest.mark.parametrize("batch", [1, 8])
def test_block_layers_equal_conv2d(built, cin, cout, k, stride, padding, dilation, groups, hw, bo, batch):
    conv = _block_conv(cin, cout, k, stride, padding, dilation, groups, 0.8, bo)
    fast = DirectSparseConv2d.from_conv(conv)
    expected = [bo] + [0] * (bo - 1)
    assert fast.block_groups().tolist() == expected * (cout // bo) and fast.block_size() == bo
    assert fast.blocked_fraction() == 1.0 and f"blocks of {bo} channels" in repr(fast)
    x = torch.randn(batch, cin, *hw)
    _check(fast, conv, x)
    fast.relu = True
    with torch.no_grad():
        _close(fast(x), F.relu(conv(x)))


def test_mixed_layer_runs_groups_of_4_pairs_and_single_channels(built):
    # groups 0, 2: one pattern over 4 channels; group 1: unstructured except one equal pair;
    # the last 2 of 14 channels cannot form a group of 4 but are an equal pair
    conv = _block_conv(16, 14, 3, padding=1, sparsity=0.85, blocky=[True, False, True])
    with torch.no_grad():
        conv.weight[6] = conv.weight[7] * 2 * (conv.weight[7] != 0)  # the pair (6, 7) shares a pattern
        conv.weight[12:14] = conv.weight[0:2]
    fast = DirectSparseConv2d.from_conv(conv)
    assert fast.block_groups().tolist() == [4, 0, 0, 0, 1, 1, 2, 0, 4, 0, 0, 0, 2, 0]
    single = int(fast.rowptr[6] - fast.rowptr[4])
    assert fast.blocked_fraction() == pytest.approx(1 - single / fast.nnz())
    for shape in ((1, 16, 20, 20), (3, 16, 7, 9)):
        _check(fast, conv, torch.randn(shape))


def test_unstructured_layers_form_no_groups_and_all_zero_groups_are_not_blocks(built):
    fast = DirectSparseConv2d.from_conv(_block_conv(16, 16, 3, padding=1, blocky=[False]))
    assert fast.block_groups() is None and fast.block_size() == 1 and fast.blocked_fraction() == 0.0
    conv = _block_conv(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight[4:].zero_()  # an empty group: nothing to share, computed as single channels
    fast = DirectSparseConv2d.from_conv(conv)
    assert fast.block_groups().tolist() == [4, 0, 0, 0, 1, 1, 1, 1]
    _check(fast, conv, torch.randn(2, 8, 9, 9))


@settings(max_examples=30, deadline=None)
@given(cin_g=st.integers(1, 6), groups_per_conv=st.integers(1, 3), conv_groups=st.sampled_from([1, 2, 3]),
       bo=st.sampled_from([2, 4]), k=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 3),
       dilation=st.integers(1, 2), h=st.integers(5, 20), w=st.integers(5, 20), batch=st.sampled_from([1, 2, 8]),
       sparsity=st.floats(0.0, 0.99), blocky=st.lists(st.booleans(), min_size=1, max_size=4),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_block_layers_equal_conv2d_on_random_shapes(built, cin_g, groups_per_conv, conv_groups, bo, k, stride,
                                                     padding, dilation, h, w, batch, sparsity, blocky, bias, seed):
    if (k - 1) * dilation + 1 > min(h, w) + 2 * padding:
        return  # no output position
    cout = bo * groups_per_conv * conv_groups  # blocks never straddle two conv groups
    conv = _block_conv(cin_g * conv_groups, cout, k, stride, padding, dilation, conv_groups, sparsity, bo,
                       blocky, bias, seed)
    _check(DirectSparseConv2d.from_conv(conv), conv, torch.randn(batch, cin_g * conv_groups, h, w))


@pytest.mark.parametrize("cin,cout,k,stride,padding,hw,batch", [
    (16, 16, 3, 1, 1, (40, 40), 1),  # many tiles: the threads split the tiles
    (32, 68, 3, 1, 1, (6, 6), 1),  # one tile: the threads split the output channels
    (16, 12, 1, 1, 0, (7, 7), 3),  # read in place, images split across threads
    (3, 16, 7, 2, 3, (33, 30), 2),  # strided, phase-split input
])
def test_block_layers_give_the_same_bits_on_any_number_of_threads(built, threads, cin, cout, k, stride, padding,
                                                                  hw, batch):
    conv = _block_conv(cin, cout, k, stride, padding, sparsity=0.8, blocky=[True, True, False])
    fast = DirectSparseConv2d.from_conv(conv, relu=True)
    groups = fast.block_groups()
    x = torch.randn(batch, cin, *hw)
    outs = []
    with torch.no_grad():
        for n in (1, 2, 3, 4):
            threads(n)
            outs.append(fast(x))
            for _, _, o0, o1, _, _ in fast.thread_split(x.shape, n).tolist():  # a group stays on one thread
                assert (o0 == cout or groups[o0] != 0) and (o1 == cout or groups[o1] != 0)
        _close(outs[0], F.relu(conv(x)))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_the_operator_refuses_groups_whose_channels_differ(built):
    fast = DirectSparseConv2d.from_conv(_block_conv(8, 8, 3, padding=1, blocky=[False]))
    off, blocks, geometry = fast.plan(9, 9)
    x = torch.randn(1, 8, 9, 9)
    bad = torch.tensor([4, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="have different taps"):
        torch.ops.sparsify_direct.conv2d(x, off, blocks, fast.values, fast.bias, geometry, False, None, bad)
    with pytest.raises(RuntimeError, match="bad group size"):
        torch.ops.sparsify_direct.conv2d(x, off, blocks, fast.values, fast.bias, geometry, False, None,
                                         torch.tensor([3, 0, 0, 1, 1, 1, 1, 1], dtype=torch.int32))


def _block_pruned_resnet(sparsity=0.9, bo=4):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels % bo == 0:  # by block mean |W|, per layer
                w = m.weight
                score = w.abs().reshape(-1, bo, w[0].numel()).mean(1)
                keep = score > score.flatten().kthvalue(int(sparsity * score.numel())).values
                w.mul_(keep.repeat_interleave(bo, 0).reshape(w.shape))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return torch.fx.symbolic_trace(model)


def test_accelerated_block_resnet_reports_direct_b4_and_saves_and_loads(built):
    model = _block_pruned_resnet()
    x = torch.randn(2, 3, 64, 64)
    fast = accelerate(model, x, decide="always")
    rep = fast.acceleration
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(rep.path_of(n) == "direct-b4" for n in convs) and rep.count()["direct-b4"] == 20
    assert "direct-b4: 20" in str(rep) and "100% of its taps in output channel blocks" in str(rep)
    with torch.no_grad():
        ok, worst = outputs_close(model(x), fast(x), rtol=1e-4, atol=1e-5)
        assert ok, worst
        buf = io.BytesIO()
        torch.save(fast.state_dict(), buf)
        buf.seek(0)
        clone = copy.deepcopy(fast)
        for b in clone.buffers():
            b.data.zero_()  # the taps too: the groups must be found again from the loaded ones
        assert clone.get_submodule("layer1.0.conv1").block_groups() is None
        clone.load_state_dict(torch.load(buf, weights_only=True))
        assert clone.get_submodule("layer1.0.conv1").block_size() == 4
        assert torch.equal(clone(x), fast(x))


def test_finalize_accelerates_a_gmp_block_4x1_resnet18_on_the_block_path(built):
    x = torch.randn(2, 3, 32, 32)
    m = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "gmp", sparsity=0.9, block=[4, 1],
                          scope="layer", begin=0, end=0, example_inputs=x)
    run_steps(m, torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01), [(x, torch.tensor([1, 2]))] * 2)
    m.eval()
    fast = sparsify.finalize(m, accelerate={"decide": "always"})
    rows = {r.name: r for r in fast.acceleration.layers}
    convs = [n for n, mod in torchvision.models.resnet18().named_modules() if isinstance(mod, nn.Conv2d)]
    assert all(rows[n].path == "direct-b4" for n in convs), {n: rows[n].path for n in convs}
    assert rows["fc"].path != "direct-b4" and "direct-b4: 20" in str(fast.acceleration)
    with torch.no_grad():
        ok, worst = outputs_close(sparsify.finalize(m)(x), fast(x), rtol=1e-4, atol=1e-5)
        assert ok, worst
