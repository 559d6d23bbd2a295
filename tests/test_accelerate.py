"""finalize(..., accelerate=True): patch-skipping convs and CSR/BSR layers compute what the
finalized model computes, and the acceleration report names every candidate layer's path."""
from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.deploy.accelerate import (AccelerationError, PatchSkipConv2d, SparseConv1x1, SparseLinear, accelerate, fold_bn, supports_patch_skip)
from sparsify.deploy.accelerate.weight_sparse_pass import _bsr_block
from sparsify.deploy.accelerate.fold import PositionFill, folded_conv
from sparsify.deploy.accelerate.select import choose
from sparsify.deploy.compare import outputs_close
from sparsify.methods.semistructured import PositionMask

from model_parts import random_bn



@pytest.mark.parametrize("k,stride,padding,dilation,hw", [
    (3, 1, 1, 1, (10, 10)), (3, 2, 1, 1, (11, 9)), (7, 2, 3, 1, (16, 16)), (1, 1, 0, 1, (6, 7)),
    (1, 2, 0, 1, (8, 8)), (3, 1, 2, 2, (9, 9)), (5, 1, 0, 1, (9, 12)), (3, 2, 0, 1, (12, 12))])
@pytest.mark.parametrize("batch", [1, 3])
def test_patch_skip_conv_equals_masked_conv_then_bn(k, stride, padding, dilation, hw, batch):
    conv = nn.Conv2d(5, 6, k, stride, padding, dilation, bias=bool(k % 2)).eval()
    bn = random_bn(6)
    x = torch.randn(batch, 5, *hw)
    with torch.no_grad():
        y = conv(x)
        keep = torch.rand(y.shape[-2:]) > 0.4
        keep[0, 0] = False  # at least one skipped position
        expected = bn(y * keep)
        fast = PatchSkipConv2d.from_conv(conv, keep, bn, input_hw=hw)
        got = fast(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        # skipped positions hold BN(0) exactly: the folded bias of the bias-free conv
        _, b = fold_bn(conv.weight, None, bn)
        assert torch.equal(got[:, :, ~keep], b.view(1, -1, 1).expand(batch, -1, int((~keep).sum())))
        # a plain NCHW input and a channels-last one give the same result
        assert torch.equal(fast(x.contiguous(memory_format=torch.channels_last)), got)


def test_patch_skip_conv_refuses_another_resolution_and_grouped_convs():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    fast = PatchSkipConv2d.from_conv(conv, torch.ones(8, 8, dtype=torch.bool), input_hw=(8, 8))
    with pytest.raises(ValueError, match="built for 8x8"):
        fast(torch.randn(1, 4, 9, 9))
    assert "depthwise" in supports_patch_skip(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="keep mask is 5x5"):
        PatchSkipConv2d.from_conv(conv, torch.ones(5, 5, dtype=torch.bool), input_hw=(8, 8))


def test_patch_skip_gathers_only_kept_columns(monkeypatch):
    """The GEMM sees one row per kept position and sample, never the full im2col."""
    import sparsify.deploy.accelerate.patch_conv as pc
    rows_seen = []
    real = pc.gemm
    monkeypatch.setattr(pc, "gemm", lambda cols, *a, **k: rows_seen.append(cols.shape) or real(cols, *a, **k))
    monkeypatch.setattr(F, "unfold", lambda *a, **k: pytest.fail("full im2col materialised"))
    keep = torch.zeros(6, 6, dtype=torch.bool)
    keep[::2, 1::3] = True
    fast = PatchSkipConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), keep, input_hw=(6, 6))
    fast(torch.randn(2, 3, 6, 6))
    assert rows_seen == [torch.Size([2 * int(keep.sum()), 3 * 3 * 3])]


@pytest.mark.parametrize("layout,block", [("csr", None), ("bsr", 8), ("bsr", 16)])
def test_sparse_linear_and_1x1_conv_equal_dense(layout, block):
    lin = nn.Linear(32, 48)
    conv = nn.Conv2d(32, 48, 1, stride=2)
    with torch.no_grad():
        for w in (lin.weight, conv.weight):
            w.mul_(torch.rand_like(w) > 0.85)
    x = torch.randn(2, 5, 32)
    assert torch.allclose(SparseLinear.from_linear(lin, layout, block)(x), lin(x), atol=1e-5)
    xi = torch.randn(2, 32, 9, 9)
    fast = SparseConv1x1.from_conv(conv, layout, block)
    assert torch.allclose(fast(xi), conv(xi), atol=1e-5)
    # the sparse layers copy and round-trip their state dicts like any module
    clone = copy.deepcopy(fast)
    clone.load_state_dict(fast.state_dict())
    assert torch.equal(clone(xi), fast(xi))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_sparse_linear_computes_densely(dtype):
    """torch's CPU sparse matmul has no half kernels: a model cast after accelerate failed with
    '"addmm_out_sparse_csr_impl_mkl" not implemented for 'Half''."""
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.8] = 0
    fast = SparseLinear.from_linear(lin).to(dtype)
    x = torch.randn(3, 16)
    y = fast(x.to(dtype))
    assert y.dtype == dtype and torch.allclose(y.float(), lin.to(dtype)(x.to(dtype)).float(), rtol=1e-2, atol=1e-2)


def test_bsr_is_offered_only_for_block_sparse_weights():
    w = torch.zeros(64, 64)
    w[:16, 16:32] = torch.randn(16, 16)
    assert _bsr_block(w) == 32
    scattered = torch.randn(64, 64) * (torch.rand(64, 64) > 0.9)
    assert _bsr_block(scattered) is None


def _semi_structured_resnet(x, sparsity=0.3, model="resnet18"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(getattr(torchvision.models, model)(num_classes=10), "semi-structured",
                              sparsity=sparsity, begin=0, end=0, example_inputs=x)
    return m


def test_finalize_accelerate_turns_semi_structured_resnet18_into_patch_skipping_convs():
    x = torch.randn(2, 3, 64, 64)
    m = _semi_structured_resnet(x)
    plain = sparsify.finalize(m)
    fast = sparsify.finalize(m, accelerate={"decide": "always"})
    report = fast.acceleration
    masked = [n for n, mod in plain.named_modules() if isinstance(mod, PositionMask)]
    assert len(masked) == 17  # stem + 16 3x3 convs; 1x1 convs are skipped by the recipe
    convs_with_mask = {r.name for r in report.layers if r.path == "patch-skip"}
    assert len(convs_with_mask) == 17 and "conv1" in convs_with_mask
    assert all(isinstance(fast.get_submodule(n), PatchSkipConv2d) for n in convs_with_mask)
    # masks and the BNs after them are gone (folded)
    assert not any(isinstance(mod, PositionMask) for mod in fast.modules())
    assert not hasattr(fast.layer1[0], "bn1")
    # conv -> mask -> bn -> relu: the ReLU is fused; conv2 feeds the residual add: not fused
    assert fast.layer1[0].conv1.relu and not fast.layer1[0].conv2.relu and fast.conv1.relu
    # every other conv/linear is listed as dense with a reason
    assert report.path_of("fc") == "dense" and report.path_of("layer2.0.downsample.0") == "dense"
    with torch.no_grad():
        for xb in (x, torch.randn(5, 3, 64, 64)):
            ok, worst = outputs_close(plain(xb), fast(xb), rtol=1e-4, atol=1e-5)
            assert ok, worst
    assert "patch-skip: 17" in str(report)


def test_accelerate_keeps_depthwise_convs_dense_with_a_reason():
    x = torch.randn(1, 3, 64, 64)
    m = _semi_structured_resnet(x, 0.2, "mobilenet_v3_small")
    fast = sparsify.finalize(m, accelerate={"decide": "always"})
    rows = {r.name: r for r in fast.acceleration.layers}
    dw = [r for r in rows.values() if "depthwise" in r.reason]
    assert dw and all(r.path == "dense" for r in dw)
    assert rows["features.0.0"].path == "patch-skip"
    with torch.no_grad():
        assert outputs_close(sparsify.finalize(m)(x), fast(x))[0]


def test_sparse_linear_path_for_very_sparse_mlp_and_dense_below_threshold():
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(4, 64)
    m = sparsify.sparsify(mlp, "st3", sparsity=0.9, begin=0, end=0, fix=None, example_inputs=x)
    fast = sparsify.finalize(m, accelerate={"decide": "always"})
    paths = {r.name: r.path for r in fast.acceleration.layers}
    # global threshold: the big layers are past 80% sparsity
    sp = {r.name: r.sparsity for r in fast.acceleration.layers}
    for name, s in sp.items():
        assert paths[name] == ("csr" if s >= 0.8 else "dense"), (name, s, paths[name])
    assert "csr" in paths.values()
    assert isinstance(fast.get_submodule("0"), SparseLinear) == (paths["0"] == "csr")
    with torch.no_grad():
        assert outputs_close(sparsify.finalize(m)(x), fast(x))[0]
    never = sparsify.finalize(m, accelerate={"decide": "never"})
    assert set(r.path for r in never.acceleration.layers) == {"dense"}


@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_equals_conv_then_batchnorm_with_near_zero_variances(affine):
    """Channels a sparse net silenced have running variances near 0, where eps is most of the scale."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4, affine=affine).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.0, 1e-7, 1e-5, 1.0]))
        bn.running_mean.uniform_(-1, 1)
        if affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    w, b = fold_bn(conv.weight, conv.bias, bn)
    with torch.no_grad():
        assert torch.allclose(F.conv2d(x, w, b), bn(conv(x)), rtol=1e-4, atol=1e-4)


class _FakeClock:
    """A clock that moves only when a candidate says it worked: decisions tested without timing."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def work(self, seconds):
        return lambda: setattr(self, "t", self.t + seconds)


def test_measured_choice_keeps_dense_when_the_sparse_candidate_is_slower(monkeypatch):
    from sparsify.deploy.accelerate import select
    clock = _FakeClock()
    monkeypatch.setattr(select, "_clock", lambda name: clock)
    path, times, why = choose({"dense": clock.work(0.001), "csr": clock.work(0.002)}, repeats=3)
    assert path == "dense" and times == pytest.approx({"dense": 1.0, "csr": 2.0}) and "beat dense" in why
    path, times, why = choose({"dense": clock.work(0.002), "csr": clock.work(0.001)}, repeats=3)
    assert path == "csr" and "2.00x dense" in why
    # within the 5% margin dense stays: timing noise does not swap layers
    assert choose({"dense": clock.work(0.100), "csr": clock.work(0.096)}, repeats=3)[0] == "dense"


def test_timing_clock_counts_cpu_work_on_one_thread():
    """With one thread the decision uses CPU time (waiting for a core is not counted), else wall time."""
    from sparsify.deploy.accelerate.select import _clock, time_calls
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _clock("auto") is time.process_time
        torch.set_num_threads(2)
        assert _clock("auto") is time.perf_counter
        assert _clock("cpu") is time.process_time and _clock("wall") is time.perf_counter
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="clock"):
        time_calls({"a": lambda: None}, clock="gpu")


def test_measured_acceleration_output_equals_finalized():
    x = torch.randn(1, 3, 32, 32)
    m = _semi_structured_resnet(x)
    fast = sparsify.finalize(m, accelerate=True)  # decide="measure": whatever wins, outputs agree
    plain = sparsify.finalize(m)
    masks = sum(isinstance(mod, PositionMask) for mod in plain.modules())
    assert masks >= 10  # layer4's 1x1 outputs at 32x32 keep their single position: no mask there
    # every conv and linear is listed: the masked ones, the 3 downsample 1x1 convs + fc, and the
    # unmasked k x k convs (dense: weight sparsity below min_conv_sparsity)
    rows = [r for r in fast.acceleration.layers if not r.kind.startswith("MaxPool2d")]  # pools: own rows
    assert len(rows) == sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in plain.modules())
    assert len(rows) > masks + 4
    assert all(r.times_ms for r in fast.acceleration.layers if r.path != "dense" or "beat" in r.reason)


def test_accelerate_raises_when_outputs_differ(monkeypatch):
    import sparsify.deploy.accelerate.convert as cv
    x = torch.randn(1, 3, 32, 32)
    final = sparsify.finalize(_semi_structured_resnet(x))
    monkeypatch.setattr(cv.PatchSkipConv2d, "forward", lambda self, inp: torch.zeros(
        inp.shape[0], self.out_channels, *self.keep.shape))
    with pytest.raises(AccelerationError, match="differs"):
        accelerate(final, x, decide="always")


def test_finalize_accelerate_takes_example_inputs_given_to_finalize():
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "st3", begin=0, end=0, fix=None)
    fast = sparsify.finalize(m, torch.randn(3, 4), accelerate=True)
    assert fast.acceleration.input_shapes == [[3, 4]]
    assert fast.acceleration.path_of("0") == "dense"


def test_patch_skip_conv_reuses_its_buffers_without_stale_values():
    """The padded input and gather buffers live across calls (no fresh 7 MB tensors per call at
    batch 8); each call still computes from its own input, any batch size, padded or not."""
    for padding in (1, 0):
        conv = nn.Conv2d(4, 6, 3, padding=padding).eval()
        bn = random_bn(6)
        hw = (9, 9)
        keep = torch.rand(9 - 2 * (1 - padding), 9 - 2 * (1 - padding)) > 0.3
        keep[0, 0] = False
        fast = PatchSkipConv2d.from_conv(conv, keep, bn, input_hw=hw)
        fast.chunk_bytes = 4 * 9 * 4 * 7  # row blocks of 7 rows: several GEMMs per call
        with torch.no_grad():
            buffers = set()
            for batch in (2, 2, 3, 3):
                x = torch.randn(batch, 4, *hw) * 10
                assert torch.allclose(fast(x), bn(conv(x) * keep), atol=1e-4, rtol=1e-5)
                nchw = fast(x.contiguous(memory_format=torch.channels_last))
                assert torch.equal(nchw, fast(x))
                st = next(iter(fast._batch_cache.values()))
                buffers.add((batch, st["cols"].data_ptr()))
            assert len(buffers) == 2  # built when the batch size changes, not on every call


def test_accelerate_folds_batchnorm_into_the_convs_that_stay_dense():
    x = torch.randn(2, 3, 32, 32)
    m = _semi_structured_resnet(x)
    plain = sparsify.finalize(m)
    never = sparsify.finalize(m, x, accelerate={"decide": "never"})
    masked = sum(isinstance(mod, PositionMask) for mod in plain.modules())
    assert not any(isinstance(mod, (nn.BatchNorm2d, PositionMask)) for mod in never.modules())
    assert sum(isinstance(mod, PositionFill) for mod in never.modules()) == masked
    # resnet18 has 20 BNs; those after a mask are listed with their conv, the rest (downsample
    # BNs, and layer4's at 32x32, whose 1x1 outputs keep their one position) are counted
    assert never.acceleration.folded_bn == 20 - masked
    # the masked 3x3 convs say so; unmasked ones are listed as weight-dense (direct conv candidates)
    masked_rows = [r for r in never.acceleration.layers
                   if r.kind.startswith("Conv2d") and r.kind.endswith("3x3") and "weight sparsity" not in r.reason]
    assert len(masked_rows) >= masked - 1 and all("BN folded" in r.reason for r in masked_rows)
    assert f"BN folded into {20 - masked} other convs" in str(never.acceleration)
    kept_bn = sparsify.finalize(m, x, accelerate={"decide": "never", "fold_bn": False})
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in kept_bn.modules()) == 20
    with torch.no_grad():
        for xb in (x, torch.randn(3, 3, 32, 32)):
            assert outputs_close(plain(xb), never(xb))[0]
            assert torch.equal(plain(xb), kept_bn(xb))


def test_position_fill_writes_bn_of_zero_at_skipped_positions_in_both_layouts():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1).eval(), random_bn(5)
    keep = torch.rand(6, 6) > 0.5
    keep[0, 0] = False
    dense = nn.Sequential(folded_conv(conv, bn), PositionFill(keep, fold_bn(conv.weight, None, bn)[1]))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = bn(conv(x) * keep)
        assert torch.allclose(dense(x), expected, atol=1e-5)
        cl = dense.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(cl, expected, atol=1e-5)
        with pytest.raises(ValueError, match="built for"):
            dense(torch.randn(1, 3, 7, 7))


def test_sparse_linear_row_blocks_equal_one_call():
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.9)
    fast = SparseLinear.from_linear(lin, "csr")
    x = torch.randn(3, 23, 48)
    whole = fast(x)
    fast.token_block = 8  # 69 rows: 8 full blocks and a partial one
    assert torch.allclose(fast(x), whole, atol=1e-6) and torch.allclose(whole, lin(x), atol=1e-5)
    # the output is a transposed view; a following sparse layer takes it as is
    nxt = SparseLinear.from_linear(nn.Linear(40, 16), "csr")
    nxt.token_block = 16
    assert torch.allclose(nxt(fast(x)), nxt(whole.contiguous()), atol=1e-5)
    assert "token_block=8" in repr(fast)


def test_measured_csr_choice_tries_row_blocks_on_many_rows():
    mlp = nn.Sequential(nn.Linear(64, 128))
    with torch.no_grad():
        mlp[0].weight.mul_(torch.rand_like(mlp[0].weight) > 0.9)
    fast = accelerate(mlp, torch.randn(4, 100, 64))  # 400 rows: blocks of 128 and 32 are timed
    row = fast.acceleration.layers[0]
    assert {"dense", "csr", "csr/128", "csr/32"} <= set(row.times_ms)
    assert row.path in ("dense", "csr")
    few = accelerate(mlp, torch.randn(2, 64))
    assert set(few.acceleration.layers[0].times_ms) <= {"dense", "csr"}


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", [
    (3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False), (3, 2, 0, 2, True), ((3, 2), (2, 1), (1, 0), 1, True),
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channels_last_max_pool_equals_max_pool_and_keeps_the_layout(kernel, stride, padding, dilation, ceil_mode,
                                                                     layout):
    from sparsify.deploy.accelerate.pool import ChannelsLastMaxPool2d
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    fast = ChannelsLastMaxPool2d.from_pool(pool)
    x = torch.randn(2, 5, 13, 11).contiguous(memory_format=layout)
    y = fast(x)
    assert torch.equal(y, pool(x)) and y.is_contiguous(memory_format=layout)
    assert torch.equal(fast(x[0]), pool(x[0]))  # 3-D input: the plain pool
    with pytest.raises(ValueError, match="indices"):
        ChannelsLastMaxPool2d.from_pool(nn.MaxPool2d(2, return_indices=True))


def test_accelerate_times_the_max_pool_of_an_nchw_network_and_reports_it():
    from sparsify.deploy.accelerate.direct_conv import direct_available
    from sparsify.deploy.accelerate.pool import ChannelsLastMaxPool2d, DirectMaxPool2d
    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    built = direct_available() is None  # the compiled NCHW pool comes with the direct conv's build
    print("compiled pool available:", built)
    first, cls = ("direct-pool", DirectMaxPool2d) if built else ("channels-last", ChannelsLastMaxPool2d)
    fast = accelerate(model, x, decide="always")
    row = next(r for r in fast.acceleration.layers if r.name == "maxpool")
    assert (row.kind, row.path) == ("MaxPool2d 3x3", first)
    assert isinstance(fast.get_submodule("maxpool"), cls)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)
    measured = accelerate(model, x)  # whichever wins, it is timed and listed
    row = next(r for r in measured.acceleration.layers if r.name == "maxpool")
    paths = {"dense", "channels-last"} | ({"direct-pool"} if built else set())
    assert set(row.times_ms) == paths and row.path in paths


def test_accelerate_refuses_a_model_off_the_cpu_in_one_line():
    lin = nn.Sequential(nn.Linear(8, 8, device="meta"))  # any non-CPU device: meta runs everywhere
    with pytest.raises(ValueError, match=r"on meta: call it on model\.cpu\(\)"):
        accelerate(lin, torch.randn(2, 8), decide="always")
    with pytest.raises(ValueError, match="on meta"):
        accelerate(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8, device="meta"), decide="always")


def test_finalized_sas_layers_are_listed_in_the_report():
    """The report of a SAS ResNet-18 listed conv1 and maxpool only: its 20 SAS layers (graphs,
    no Conv/Linear module) were in no row, where the docs say every candidate layer is listed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(2, 3, 6, 6)
    m = sparsify.sparsify(net, "sas", total_steps=2, example_inputs=x)
    report = sparsify.finalize(m, accelerate={"decide": "always"}).acceleration
    sas = {r.name: r for r in report.layers if r.kind.startswith("SAS")}
    assert sorted(sas) == ["2", "5"]
    assert sas["2"].kind == "SAS Conv2d 3x3" and sas["5"].kind == "SAS Linear"
    assert all(r.path == "dense" and "no sparse kernel" in r.reason for r in sas.values())
    assert "SAS Conv2d 3x3" in str(report)


def test_torch_sparse_beta_warning_does_not_reach_the_user():
    """accelerate let torch's "Sparse CSR tensor support is in beta state" UserWarning through
    (from the CSR conversion). torch raises it once per process, so a fresh process checks it."""
    import os
    import subprocess
    import sys
    code = """if True:
        import warnings, torch
        from sparsify.deploy.accelerate import accelerate
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        with torch.no_grad():
            net[0].weight[:, :60] = 0
            net[2].weight[:16] = 0  # whole 16x16 blocks: a BSR candidate too
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fast = accelerate(net, torch.randn(4, 64), decide="always")
            fast(torch.randn(4, 64))
        print(sorted(fast.acceleration.count()))
        print([str(w.message)[:60] for w in seen if "beta" in str(w.message)])
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's sparsify
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    paths, beta = out.stdout.strip().splitlines()[-2:]
    assert "'csr'" in paths or "'bsr16'" in paths  # a compressed sparse tensor was made
    assert beta == "[]"
