"""The direct sparse convolution (sparsify.deploy.accelerate.direct_conv): equal to F.conv2d on
many conv shapes and sparsities, chosen per layer in accelerate(), saved and loaded, and dense
with one warning where the extension cannot be built."""
from __future__ import annotations

import copy
import io
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.deploy.accelerate import DirectSparseConv2d, accelerate
from sparsify.deploy.accelerate import extension
from sparsify.deploy.compare import outputs_close


def _sparse_conv(cin, cout, k, stride, padding, dilation, groups, sparsity, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= sparsity)
    return conv


def _close(a, b):
    # float32 sums in another order (and fused multiply-adds): the accelerate() rule
    ok, worst = outputs_close(b, a, rtol=1e-4, atol=1e-5)
    assert a.shape == b.shape and ok, worst


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,hw", [
    (8, 16, 3, 1, 1, 1, 1, (56, 56)),  # many tiles per plane
    (16, 8, 1, 1, 0, 1, 1, (7, 7)),  # read in place, one partial tile
    (16, 8, 1, 1, 0, 1, 1, (8, 8)),  # read in place, exactly one tile
    (16, 24, 1, 2, 0, 1, 1, (15, 14)),  # strided 1x1 (downsample)
    (3, 16, 7, 2, 3, 1, 1, (33, 30)),  # ResNet stem, odd sizes
    (8, 8, 3, 2, 1, 1, 1, (14, 14)),
    (8, 8, 3, 1, 2, 2, 1, (13, 11)),  # dilated
    (8, 12, 3, 1, 1, 1, 4, (10, 10)),  # grouped
    (8, 8, 3, 1, 1, 1, 8, (9, 9)),  # depthwise
    (6, 4, 5, 1, 0, 1, 1, (9, 12)),  # no padding, shifted taps: copied, not read in place
    (4, 4, (1, 3), (2, 1), (0, 1), 1, 1, (9, 9)),  # rectangular kernel, stride on one axis
    (96, 40, 3, 1, 1, 1, 1, (12, 12)),  # several input channel blocks per tile
])
@pytest.mark.parametrize("batch", [1, 8])
def test_direct_conv_equals_conv2d(built, cin, cout, k, stride, padding, dilation, groups, hw, batch):
    conv = _sparse_conv(cin, cout, k, stride, padding, dilation, groups, 0.8)
    fast = DirectSparseConv2d.from_conv(conv)
    x = torch.randn(batch, cin, *hw)
    with torch.no_grad():
        _close(fast(x), conv(x))
        fast.relu = True
        _close(fast(x), F.relu(conv(x)))
    assert fast.nnz() == int((conv.weight != 0).sum())
    assert torch.equal(fast.dense_weight(), conv.weight.detach())


@settings(max_examples=30, deadline=None)
@given(cin_g=st.integers(1, 6), cout_g=st.integers(1, 6), groups=st.sampled_from([1, 2, 3]),
       k=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 3), dilation=st.integers(1, 2),
       h=st.integers(5, 20), w=st.integers(5, 20), batch=st.sampled_from([1, 2, 8]),
       sparsity=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_direct_conv_equals_conv2d_on_random_shapes(built, cin_g, cout_g, groups, k, stride, padding, dilation, h,
                                                     w, batch, sparsity, bias, seed):
    if (k - 1) * dilation + 1 > min(h, w) + 2 * padding:
        return  # no output position
    conv = _sparse_conv(cin_g * groups, cout_g * groups, k, stride, padding, dilation, groups, sparsity, bias, seed)
    x = torch.randn(batch, cin_g * groups, h, w)
    with torch.no_grad():
        _close(DirectSparseConv2d.from_conv(conv)(x), conv(x))


def test_direct_conv_plans_per_input_size_and_all_zero_weights(built):
    conv = _sparse_conv(8, 8, 3, 2, 1, 1, 1, 0.9)
    fast = DirectSparseConv2d.from_conv(conv)
    with torch.no_grad():
        for hw in (16, 9, 16, 31):  # the plan follows the input size back and forth
            x = torch.randn(2, 8, hw, hw)
            _close(fast(x), conv(x))
        conv.weight.zero_()
        empty = DirectSparseConv2d.from_conv(conv)
        x = torch.randn(1, 8, 10, 10)
        assert empty.nnz() == 0 and torch.equal(empty(x), conv(x))  # every output is the bias
        x = x.contiguous(memory_format=torch.channels_last)
        _close(fast(x), DirectSparseConv2d.from_conv(_sparse_conv(8, 8, 3, 2, 1, 1, 1, 0.9))(x.contiguous()))


def test_direct_conv_with_autograd_uses_the_dense_weight():
    conv = _sparse_conv(4, 4, 3, 1, 1, 1, 1, 0.7)
    fast = DirectSparseConv2d.from_conv(conv)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    fast(x).sum().backward()
    ref = x.detach().clone().requires_grad_()
    conv(ref).sum().backward()
    assert torch.allclose(x.grad, ref.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_cast_direct_conv_computes_densely_in_its_dtype(dtype):
    """docs/deployment.md: for another dtype the layer computes densely; ``fast.half()`` failed
    with "Index put requires the source and destination dtypes match" (the dense weight was
    built in float32 whatever the values' dtype)."""
    conv = _sparse_conv(4, 6, 3, 1, 1, 1, 1, 0.7)
    fast = DirectSparseConv2d.from_conv(conv).to(dtype)
    x = torch.randn(2, 4, 8, 8)
    y = fast(x.to(dtype))
    assert y.dtype == dtype
    assert torch.allclose(y.float(), conv.to(dtype)(x.to(dtype)).float(), rtol=1e-2, atol=1e-2)


def _sparse_resnet(sparsity=0.9):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # magnitude pruning, per layer
                w = m.weight
                k = int(sparsity * w.numel())
                w.mul_(w.abs() > w.abs().flatten().kthvalue(k).values)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return torch.fx.symbolic_trace(model)


def test_accelerate_runs_weight_sparse_resnet_convs_direct_and_reports_each_layer(built, tmp_path):
    model = _sparse_resnet()
    x = torch.randn(2, 3, 64, 64)
    fast = accelerate(model, x, decide="always")
    rep = fast.acceleration
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(rep.path_of(n) == "direct" for n in convs)
    assert all(isinstance(fast.get_submodule(n), DirectSparseConv2d) for n in convs)
    kinds = {r.name: r.kind for r in rep.layers}
    assert kinds["conv1"] == "Conv2d 7x7" and kinds["layer2.0.downsample.0"] == "Conv2d 1x1"
    # BN folded into every conv; conv -> BN -> ReLU: the ReLU runs inside the conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    # conv2 -> BN -> (+ identity) -> ReLU: the add and the ReLU run inside conv2 (fuse.py)
    assert fast.get_submodule("layer1.0.conv1").relu and fast.get_submodule("layer1.0.conv2").relu
    assert "ReLU fused" in next(r.reason for r in rep.layers if r.name == "conv1")
    assert rep.count()["direct"] == 20 and "direct: 20" in str(rep)
    with torch.no_grad():
        for xb in (x, torch.randn(8, 3, 64, 64), torch.randn(1, 3, 48, 40)):
            ok, worst = outputs_close(model(xb), fast(xb), rtol=1e-4, atol=1e-5)
            assert ok, worst
        # saves and loads: state_dict (weights_only) into a copy, and the whole module pickled
        buf = io.BytesIO()
        torch.save(fast.state_dict(), buf)
        buf.seek(0)
        clone = copy.deepcopy(fast)
        for p in clone.buffers():
            p.data.zero_() if p.is_floating_point() else None
        clone.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(clone(x), fast(x))
        assert torch.equal(pickle.loads(pickle.dumps(fast))(x), fast(x))


def test_measured_choice_times_dense_and_direct_for_each_conv(built):
    model = _sparse_resnet(0.95)
    x = torch.randn(1, 3, 64, 64)
    fast = accelerate(model, x, min_conv_sparsity=0.5)
    for r in fast.acceleration.layers:
        if r.kind.startswith("Conv2d"):
            assert set(r.times_ms) >= {"dense", "direct"} and r.sparsity >= 0.94
            assert r.path in (("dense", "direct", "csr") if r.kind == "Conv2d 1x1" else ("dense", "direct")) and r.reason


def test_direct_conv_falls_back_to_dense_with_one_warning_when_it_cannot_be_built(monkeypatch):
    def no_compiler():
        raise RuntimeError("simulated: c++: command not found")

    monkeypatch.setattr(extension, "_build", no_compiler)
    monkeypatch.setattr(extension, "_op_loaded", lambda: False)
    monkeypatch.setattr(extension, "_state", {"tried": False, "why": None})
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: command not found.*stay dense"):
        why = extension.direct_available()
    assert "simulated" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: later calls are quiet
        assert extension.direct_available() == why
        model = nn.Sequential(_sparse_conv(4, 8, 3, 1, 1, 1, 1, 0.9), nn.ReLU())
        x = torch.randn(1, 4, 12, 12)
        fast = accelerate(model, x, decide="always")
        assert fast.acceleration.path_of("0") == "dense" and "simulated" in fast.acceleration.layers[0].reason
        # a direct conv made elsewhere (a loaded model) still computes, with its dense weight
        direct = DirectSparseConv2d.from_conv(model[0])
        with torch.no_grad():
            _close(direct(x), model[0](x))


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits forever on the lock of a build that was killed (SIGKILL, a CI time limit): the
    test suite hung on one. A lock older than a build could take is removed, with a warning."""
    import time
    lock = tmp_path / "lock"
    lock.touch()
    assert not extension.clear_stale_lock(str(tmp_path)) and lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="left 60 minutes ago by a build .* that did not finish"):
        assert extension.clear_stale_lock(str(tmp_path))
    assert not lock.exists()
    assert not extension.clear_stale_lock(str(tmp_path))  # no lock: nothing to say


def test_each_torch_version_builds_in_a_folder_of_its_own():
    folder = os.path.basename(extension.build_directory())
    assert torch.__version__.split("+")[0] in folder and folder.startswith(extension.EXTENSION_NAME)


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("cin,cout,k,stride,padding,hw,batch", [
    (16, 16, 3, 1, 1, (40, 40), 1),  # many tiles: the threads split the tiles
    (32, 64, 3, 1, 1, (6, 6), 1),  # one tile: the threads split the output channels
    (16, 8, 1, 1, 0, (7, 7), 3),  # read in place, images split across threads
    (3, 16, 7, 2, 3, (33, 30), 2),  # strided, phase-split input
])
def test_direct_conv_gives_the_same_bits_on_any_number_of_threads(built, threads, cin, cout, k, stride, padding,
                                                                   hw, batch):
    # each output is summed by one thread in one order, whatever the split
    conv = _sparse_conv(cin, cout, k, stride, padding, 1, 1, 0.8)
    fast = DirectSparseConv2d.from_conv(conv, relu=True)
    x = torch.randn(batch, cin, *hw)
    outs = []
    with torch.no_grad():
        for n in (1, 2, 3, 4):
            threads(n)
            outs.append(fast(x))
        _close(outs[0], F.relu(conv(x)))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@settings(max_examples=40, deadline=None)
@given(cout=st.integers(1, 40), k=st.sampled_from([1, 3]), hw=st.integers(3, 30), batch=st.integers(1, 4),
       nthreads=st.integers(1, 6), forced=st.integers(-1, 6), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 99))
def test_thread_split_covers_every_tile_and_output_channel_once(built, cout, k, hw, batch, nthreads, forced,
                                                                sparsity, seed):
    conv = _sparse_conv(8, cout, k, 1, k // 2, 1, 1, sparsity, seed=seed)
    fast = DirectSparseConv2d.from_conv(conv)
    shape = (batch, 8, hw, hw)
    tiles = -(-hw * (hw + 2 * (k // 2) - k + 1 + (k - 1)) // 64)
    units = batch * tiles
    if forced > 0 and (nthreads % forced or units < forced):
        with pytest.raises(RuntimeError, match="no split"):
            fast.thread_split(shape, nthreads, forced)
        return
    split = fast.thread_split(shape, nthreads, forced)
    assert split.shape == (nthreads, 6)
    covered = torch.zeros(units, cout, dtype=torch.int32)
    for u0, u1, o0, o1, _, _ in split.tolist():
        covered[u0:u1, o0:o1] += 1
    assert bool((covered == 1).all())
    total = fast.nnz() * hw * (hw + 2 * (k // 2) - k + 1 + (k - 1))
    assert int(split[:, 4].sum()) == batch * total
    if forced > 0:
        assert len({(a, b) for a, b in split[:, :2].tolist()}) == forced


def test_the_kernel_runs_on_every_thread_with_balanced_work(built, threads):
    # layer3 of ResNet-18 at 90%: a global threshold leaves some output channels with many more
    # taps than others; the split must still give both threads about the same work
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.2, 3, 128).view(-1, 1, 1, 1))  # channel scales differ
        w = conv.weight
        w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.9 * w.numel())).values)
    fast = DirectSparseConv2d.from_conv(conv)
    counts = (fast.rowptr[1:] - fast.rowptr[:-1]).double()
    assert counts.max() > 5 * counts.min().clamp(min=1)  # the imbalance is there to balance
    for shape in ((1, 128, 14, 14), (1, 128, 5, 5), (8, 128, 14, 14)):
        split = fast.thread_split(shape, 2)
        assert float(split[:, 5].max() / split[:, 5].double().mean()) < 1.05, split
    threads(2)
    x = torch.randn(1, 128, 14, 14)
    torch.ops.sparsify_direct.profile(True, -1)
    try:
        with torch.no_grad():
            fast(x)
        prof = torch.ops.sparsify_direct.profile(False, -1)
    finally:
        torch.ops.sparsify_direct.profile(False, -1)
    # two parts, run by two different threads (a build without OpenMP runs both on thread 0)
    assert prof.shape == (2, 2) and sorted(prof[:, 1].tolist()) == [0, 1] and bool((prof[:, 0] > 0).all())
