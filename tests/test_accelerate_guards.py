"""Guards for finalize(..., accelerate=...) behaviour a mutation probe of sparsify/deploy/accelerate
found unguarded: the acceleration report (BN folded, ReLU fused, groups, inclusive thresholds,
row-block candidates and the layer built for them), the decision's fastest-run rule and its
refusal of an unknown decide, what stays unfused or dense (shared convs, ReLU subclasses, padded or
grouped 1x1 convs, reflect padding, pools with indices), layouts and dtypes, and state_dicts loaded
into used layers. The extension's switch and build folder, and finalize's option checks:
tests/test_accelerate_options.py."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import pytest

from sparsify.deploy.accelerate import SparseConv1x1, SparseLinear, accelerate
from sparsify.deploy.accelerate import weight_sparse_pass
from sparsify.deploy.accelerate.select import time_calls
from sparsify.deploy.compare import outputs_close
from sparsify.methods.semistructured import PositionMask

from model_parts import random_bn





def _prune(layer: nn.Module, zeros: int) -> nn.Module:
    """Zero ``zeros`` weights of ``layer`` at scattered positions and make the rest non-zero."""
    g = torch.Generator().manual_seed(zeros)
    with torch.no_grad():
        w = layer.weight.view(-1)
        w.copy_(torch.rand(w.shape, generator=g) + 0.1)
        w[torch.randperm(w.numel(), generator=g)[:zeros]] = 0
    return layer


def _masked_cnn(hw: int = 8) -> fx.GraphModule:
    """conv -> position mask -> BN -> ReLU, then a plain conv: a finalized semi-structured net."""
    torch.manual_seed(0)
    keep = (torch.rand(hw, hw) > 0.3).float()
    keep[0, 0] = 0
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Identity(), random_bn(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1))
    gm = fx.symbolic_trace(net.eval())  # the mask refuses tracing: put it in after
    gm.add_submodule("1", PositionMask(keep))
    return gm


def test_report_says_bn_folded_and_relu_fused_only_where_it_happened():
    """A masked conv kept dense without BN folding is not reported as folded or ReLU-fused."""
    model, x = _masked_cnn(), torch.randn(2, 3, 8, 8)
    plain = accelerate(model, x, decide="never", fold_bn=False).acceleration.layers[0]
    assert plain.path == "dense" and "BN folded" not in plain.reason and "ReLU fused" not in plain.reason
    folded = accelerate(model, x, decide="never").acceleration.layers[0]
    assert "BN folded" in folded.reason and "ReLU fused" not in folded.reason
    fast = accelerate(model, x, decide="always").acceleration.layers[0]
    assert fast.path == "patch-skip" and "BN folded" in fast.reason and "ReLU fused" in fast.reason


def test_dense_convs_get_channels_last_weights_beside_patch_skipping_convs():
    """Once a patch-skipping conv is chosen, the convs left dense store channels-last weights."""
    model, x = _masked_cnn(), torch.randn(2, 3, 8, 8)
    fast = accelerate(model, x, decide="always")
    assert fast.acceleration.path_of("0") == "patch-skip"
    assert fast.get_submodule("4").weight.is_contiguous(memory_format=torch.channels_last)
    never = accelerate(model, x, decide="never")
    assert never.get_submodule("4").weight.is_contiguous()


class _TwoBranches(nn.Module):
    """Holds two traced masked branches; its forward only ever runs the first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _masked_cnn(), _masked_cnn()

    def forward(self, x):
        return self.a(x)


def test_a_masked_conv_the_example_inputs_never_reach_is_listed_dense():
    """A masked conv the example inputs never call stays dense, with that reason (no crash)."""
    fast = accelerate(_TwoBranches().eval(), torch.randn(1, 3, 8, 8), decide="always")
    row = next(r for r in fast.acceleration.layers if r.name == "b.0")
    assert row.path == "dense" and "never called" in row.reason
    assert fast.acceleration.path_of("a.0") == "patch-skip"


def test_grouped_convs_are_listed_with_their_groups():
    """The report's kind names a grouped conv's groups ("Conv2d 3x3 g8")."""
    net = nn.Sequential(_prune(nn.Conv2d(8, 8, 3, padding=1, groups=8), 60), _prune(nn.Conv2d(8, 8, 3), 500))
    kinds = {r.name: r.kind for r in accelerate(net, torch.randn(1, 8, 9, 9), decide="never").acceleration.layers}
    assert kinds == {"0": "Conv2d 3x3 g8", "1": "Conv2d 3x3"}


def test_sparsity_thresholds_are_inclusive(built):
    """A layer with exactly min_sparsity (Linear) / min_conv_sparsity (Conv2d) zeros is eligible."""
    lin = nn.Sequential(_prune(nn.Linear(8, 8), 48))  # 75% zeros: exact in float32, unlike 80%
    assert accelerate(lin, torch.randn(3, 8), decide="always", min_sparsity=0.75).acceleration.path_of("0") == "csr"
    conv = nn.Sequential(_prune(nn.Conv2d(2, 4, 3), 36))  # 72 weights, 50% zeros
    assert accelerate(conv, torch.randn(1, 2, 8, 8), decide="always").acceleration.path_of("0").startswith("direct")


def test_accelerate_compares_against_the_eval_model_when_given_one_in_training_mode():
    """A model handed over in training mode (dropout) is checked in eval mode, so it passes."""
    net = nn.Sequential(_prune(nn.Linear(32, 32), 900), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    fast = accelerate(net, torch.randn(4, 32), decide="always")
    assert fast.acceleration.path_of("0") == "csr" and not fast.training


def test_row_block_candidates_follow_the_rows_the_layer_sees():
    """CSR row blocks of b are timed only past 2*b rows, counted after a 1x1 conv's stride."""
    lin = nn.Sequential(_prune(nn.Linear(32, 32), 950))
    times = accelerate(lin, torch.randn(200, 32)).acceleration.layers[0].times_ms
    assert set(times) == {"dense", "csr", "csr/32"}  # 200 rows: more than 64, not more than 256
    conv = nn.Sequential(_prune(nn.Conv2d(32, 32, 1, stride=2, bias=False), 950))
    times = accelerate(conv, torch.randn(1, 32, 16, 16), min_conv_sparsity=1.0).acceleration.layers[0].times_ms
    assert set(times) == {"dense", "csr"}  # 8x8 = 64 output rows: no row blocks


def test_a_row_block_choice_builds_the_layer_with_that_block(monkeypatch):
    """When CSR in row blocks of 32 wins, the layer takes 32 rows per call and reports path csr."""
    real = weight_sparse_pass.choose

    def prefer_blocks(cands, decide, margin):
        if "csr/32" in cands:
            return "csr/32", {k: 1.0 for k in cands}, "fastest: 2.00x dense on this input"
        return real(cands, decide, margin)

    monkeypatch.setattr(weight_sparse_pass, "choose", prefer_blocks)
    lin = nn.Sequential(_prune(nn.Linear(32, 32), 950))
    x = torch.randn(100, 32)
    fast = accelerate(lin, x)
    row = fast.acceleration.layers[0]
    assert row.path == "csr" and "32 input rows per sparse call" in row.reason
    assert isinstance(fast[0], SparseLinear) and fast[0].token_block == 32


def test_time_calls_keeps_each_candidates_fastest_run(monkeypatch):
    """A candidate is timed by its fastest run: one slow run (a burst of load) does not count."""
    from sparsify.deploy.accelerate import select
    clock = {"t": 0.0}
    monkeypatch.setattr(select, "_clock", lambda name: (lambda: clock["t"]))
    durations = [5.0, 5.0, 1.0, 9.0, 9.0]  # 2 warm-up calls, then 3 timed runs
    calls = []

    def work():
        clock["t"] += durations[len(calls)]
        calls.append(1)

    assert time_calls({"a": work}, repeats=3, warmup=2) == {"a": pytest.approx(1000.0)}
    assert len(calls) == 5  # the warm-up calls ran first and were not timed


def test_an_unknown_decide_is_refused():
    """decide is "measure", "always" or "never": anything else is a ValueError, not a silent measure."""
    with pytest.raises(ValueError, match="decide must be one of"):
        accelerate(nn.Sequential(_prune(nn.Linear(16, 16), 250)), torch.randn(2, 16), decide="sometimes")


def test_bn_folds_into_a_reflect_padded_conv_keeping_its_padding():
    """A conv -> BN pair with padding_mode="reflect" folds into one conv that still pads by reflection."""
    torch.manual_seed(0)
    net = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), random_bn(8),
                                          nn.ReLU()).eval())
    x = torch.randn(2, 3, 8, 8)
    fast = accelerate(net, x, decide="never")  # the check compares with the unfolded model
    assert fast.acceleration.folded_bn == 1 and fast.get_submodule("0").padding_mode == "reflect"


# --- epilogue fusion of direct sparse convs ---------------------------------------------------

def _sparse_conv(seed: int, c: int = 8) -> nn.Conv2d:
    torch.manual_seed(seed)
    return _prune(nn.Conv2d(c, c, 3, padding=1), 9 * c * c * 9 // 10)


class _SharedConv(nn.Module):
    """One direct conv called twice: a ReLU reads one call's output, an add the other's."""

    def __init__(self):
        super().__init__()
        self.c = _sparse_conv(1)

    def forward(self, x):
        a = torch.relu(self.c(x))
        return a + self.c(-x)


class _NotPlainReaders(nn.Module):
    """Direct convs whose outputs are read by things that are not a plain ReLU or a single add."""

    class Shifted(nn.ReLU):
        def forward(self, x):
            return F.relu(x) - 1.0

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (_sparse_conv(i) for i in range(2, 7))
        self.act = nn.ReLU()  # replaced by a Shifted after tracing (fx traces into a subclass)

    def forward(self, x):
        y = self.act(self.a(x))  # a ReLU subclass with its own forward
        y = self.b(y).clamp(-0.5, 0.5)  # a clamp is not a ReLU
        y = torch.sub(self.c(y), x)  # a subtraction is not a residual add
        z = self.d(y)
        y = z + z  # the conv output twice in one add
        w = self.e(y)
        return torch.relu(w) + w  # two readers: nothing is fused


@pytest.mark.parametrize("cls", [_SharedConv, _NotPlainReaders])
def test_only_a_plain_single_reader_is_fused_into_a_direct_conv(built, cls):
    """Fusion never changes the output: shared convs, ReLU subclasses, clamps, subtractions, x + x
    and outputs read twice stay outside the conv."""
    model = fx.symbolic_trace(cls().eval())
    if cls is _NotPlainReaders:
        model.act = _NotPlainReaders.Shifted()
    x = torch.randn(1, 8, 8, 8)
    fast = accelerate(model, x, decide="always")  # raises AccelerationError if the output moved
    assert all(r.path.startswith("direct") for r in fast.acceleration.layers)
    assert not any("fused" in r.reason for r in fast.acceleration.layers)
    with torch.no_grad():
        assert outputs_close(model(x), fast(x))[0]


def test_the_packed_gemm_keeps_autograd_working():
    """With autograd on, the GEMM behind patch-skipping convs computes through F.linear (gradients flow)."""
    from sparsify.deploy.accelerate.gemm import PackCache, gemm
    x = torch.randn(5, 6, requires_grad=True)
    w, b = torch.randn(4, 6), torch.randn(4)
    y = gemm(x, w, b, PackCache(), relu=True)
    y.sum().backward()
    assert torch.allclose(x.grad, ((x.detach() @ w.t() + b) > 0).float() @ w)


# --- max pools, 1x1 convs ---------------------------------------------------------------------

class _PoolWithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.wide = nn.MaxPool2d((3, 2), stride=(2, 1))

    def forward(self, x):
        y, idx = self.pool(x)
        return self.wide(y) + idx[:, :, :3, :3].float() * 0


def test_pools_with_indices_are_left_alone_and_others_named_by_their_kernel():
    """accelerate skips a max pool returning indices and names a 3x2 pool "MaxPool2d 3x2"."""
    fast = accelerate(_PoolWithIndices().eval(), torch.randn(1, 4, 8, 8), decide="always")
    rows = {r.name: r.kind for r in fast.acceleration.layers}
    assert rows == {"wide": "MaxPool2d 3x2"} and type(fast.pool) is nn.MaxPool2d


def test_direct_max_pool_strides_by_its_kernel_by_default():
    """DirectMaxPool2d(k) without a stride pools with stride k, as nn.MaxPool2d does."""
    from sparsify.deploy.accelerate.pool import DirectMaxPool2d
    x = torch.randn(1, 3, 9, 9)
    assert torch.equal(DirectMaxPool2d(3)(x), F.max_pool2d(x, 3))


@pytest.mark.parametrize("conv,why", [(nn.Conv2d(16, 16, 1, padding=1), "padded 1x1 conv"),
                                      (nn.Conv2d(16, 16, 1, groups=2), "grouped 1x1 conv")])
def test_padded_and_grouped_1x1_convs_are_not_held_as_sparse_matrices(conv, why):
    """A padded or grouped 1x1 conv is no CSR candidate: it stays a dense conv and computes as before."""
    from sparsify.deploy.accelerate import supports_sparse_linear
    torch.manual_seed(0)
    net = nn.Sequential(_prune(conv, conv.weight.numel() * 19 // 20))
    assert supports_sparse_linear(net[0]) == why
    fast = accelerate(net, torch.randn(2, 16, 6, 6), decide="always", min_conv_sparsity=1.0)
    assert type(fast[0]) is nn.Conv2d


# --- accelerated layers taking a loaded state_dict --------------------------------------------

def test_accelerated_layers_compute_with_a_state_dict_loaded_after_use(built):
    """load_state_dict into a patch-skipping, CSR or direct sparse layer that has already run (its
    derived weights cached) makes it compute with the loaded weights."""
    from sparsify.deploy.accelerate import DirectSparseConv2d, PatchSkipConv2d
    torch.manual_seed(0)
    keep = torch.rand(6, 6) > 0.3
    convs = [nn.Conv2d(4, 6, 3, padding=1) for _ in range(2)]
    lins = [_prune(nn.Linear(32, 16), 400) for _ in range(2)]
    with torch.no_grad():
        lins[1].weight.mul_(-3.0)  # the same positions, other values
    sparse = [_prune(nn.Conv2d(4, 6, 3, padding=1), 150), _prune(nn.Conv2d(4, 6, 3, padding=1), 150)]
    with torch.no_grad():
        sparse[1].weight.copy_(sparse[1].weight.flip(0, 2))  # as many non-zeros, elsewhere
    cases = [(PatchSkipConv2d.from_conv(c, keep) for c in convs), torch.randn(2, 4, 6, 6)], \
        [(SparseLinear.from_linear(lin, "csr") for lin in lins), torch.randn(3, 32)], \
        [(DirectSparseConv2d.from_conv(c) for c in sparse), torch.randn(2, 4, 6, 6)]
    with torch.no_grad():
        for layers, x in cases:
            layer, other = layers
            before = layer(x)
            layer.load_state_dict(other.state_dict())
            after = layer(x)
            assert not torch.allclose(after, before) and torch.allclose(after, other(x), atol=1e-5), type(layer)


# --- what each sparse layer takes -------------------------------------------------------------

@pytest.mark.parametrize("dilation", [(2, 1), (1, 2)])
def test_patch_skip_conv_with_different_dilations_per_axis(dilation):
    """A patch-skipping conv dilated along one axis only equals the masked conv."""
    from sparsify.deploy.accelerate import PatchSkipConv2d
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=2, dilation=dilation)
    x = torch.randn(2, 3, 9, 10)
    ref = conv(x)
    keep = torch.rand(ref.shape[-2:]) > 0.3
    with torch.no_grad():
        assert torch.allclose(PatchSkipConv2d.from_conv(conv, keep)(x), ref * keep, atol=1e-5)


def test_masked_convs_without_zero_numeric_padding_stay_dense_with_the_reason():
    """Reflect or "same" padding: no patch-skipping conv (it pads with zeros), the reason is said."""
    from sparsify.deploy.accelerate import supports_patch_skip
    assert "padding='same'" in supports_patch_skip(nn.Conv2d(3, 8, 3, padding="same"))
    model = _masked_cnn()
    model.add_submodule("0", nn.Conv2d(3, 8, 3, padding=1, bias=False, padding_mode="reflect"))
    fast = accelerate(model, torch.randn(2, 3, 8, 8), decide="always")
    row = fast.acceleration.layers[0]
    assert row.path == "dense" and "padding_mode='reflect'" in row.reason


def test_direct_sparse_convs_take_float32_weights_only():
    """A float64 conv is no direct sparse conv candidate (the kernel computes in float32)."""
    from sparsify.deploy.accelerate import supports_direct
    assert supports_direct(nn.Conv2d(4, 4, 3).double()) == "torch.float64 weight (float32 only)"


def test_direct_conv_blocks_can_be_turned_off():
    """use_blocks = False: a block-structured layer runs channel by channel (no groups reported)."""
    from sparsify.deploy.accelerate import DirectSparseConv2d
    w = torch.zeros(8, 4, 3, 3)
    w[:, 1, 1, 1] = torch.randn(8)
    fast = DirectSparseConv2d(w, None)
    assert fast.block_size() == 4
    fast.use_blocks = False
    assert fast.block_groups() is None and fast.block_size() == 1


def test_direct_conv_computes_densely_in_each_dtype_it_is_given():
    """The dense fallback (other dtypes, autograd) uses a weight in the input's dtype, call after call."""
    from sparsify.deploy.accelerate import DirectSparseConv2d
    conv = _prune(nn.Conv2d(4, 4, 3, padding=1), 100)
    fast = DirectSparseConv2d.from_conv(conv)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert fast(x.double()).dtype == torch.float64
    y = fast(x.requires_grad_())  # autograd on: float32, computed densely
    assert y.dtype == torch.float32 and y.requires_grad
    assert torch.allclose(y, conv(x), atol=1e-5)


def test_direct_conv_refuses_an_input_with_other_channels(built):
    """An input with the wrong number of channels is an error, as for nn.Conv2d, not garbage."""
    from sparsify.deploy.accelerate import DirectSparseConv2d
    fast = DirectSparseConv2d.from_conv(_prune(nn.Conv2d(8, 8, 3), 500))
    with torch.no_grad(), pytest.raises(RuntimeError):
        fast(torch.randn(1, 4, 8, 8))


def test_patch_skip_conv_cast_to_float64_after_use_computes_in_float64():
    """Work buffers are per dtype: a patch-skipping conv used in float32, then cast, still computes."""
    from sparsify.deploy.accelerate import PatchSkipConv2d
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    keep = torch.rand(6, 6) > 0.3
    fast = PatchSkipConv2d.from_conv(conv, keep)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        fast(x)
        got = fast.double()(x.double())
        assert got.dtype == torch.float64 and torch.allclose(got, conv.double()(x.double()) * keep, atol=1e-9)


def test_accelerate_leaves_the_callers_model_in_its_own_modes():
    """accelerate compares in eval, then gives every module of the caller's model its mode back
    (it left the whole model in eval)."""
    net = nn.Sequential(_prune(nn.Linear(64, 64), 60 * 64), nn.BatchNorm1d(64), nn.Dropout(0.1)).train()
    net[1].eval()
    before = [m.training for m in net.modules()]
    fast = accelerate(net, torch.randn(4, 64), decide="always")
    assert [m.training for m in net.modules()] == before
    assert not fast.training
