"""Guards for sparsify/deploy behaviour a mutation probe found unguarded: finalize's check leaving
the caller's state alone, the output comparison's tolerances and shape/count checks, the model
-ignores-its-input warning on integer outputs, the compact file format (bit order, no pickled
code), divergence location past in-place ops, ST-3 official checkpoints with a bias, and the
accelerated layers (patch-skipping convs, the packed-GEMM cache, BN folding)."""
from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.deploy.accelerate import PatchSkipConv2d, accelerate
from sparsify.deploy.accelerate.gemm import PackCache, gemm, onednn_available
from sparsify.deploy.compare import answered_alike, outputs_close, same_outputs
from sparsify.deploy.divergence import _differs, locate_divergence
from sparsify.deploy.finalize import check_options
from sparsify.deploy.official import to_official_state_dict
from sparsify.deploy.serialize import FORMAT, compact_state_dict, expand_state_dict, load
from sparsify.methods.st3 import ST3Mixin

IGNORES_INPUT = "does not depend on its input"


# --- finalize -------------------------------------------------------------------------------

class CountingMCDropout(nn.Module):
    """Draws random numbers in eval (MC dropout) and counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return F.dropout(self.fc(x), 0.1, training=True)


def test_finalize_check_leaves_the_callers_rng_and_the_models_buffers_alone():
    """finalize(check=True) neither moves the caller's random stream nor the returned model's buffers."""
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(CountingMCDropout(), "gmp", total_steps=10, example_inputs=(x,))
        calls = float(m.calls)
        torch.manual_seed(1)
        expected = torch.rand(3)
        torch.manual_seed(1)
        final = sparsify.finalize(m, (x,))
    rng_kept = bool(torch.equal(torch.rand(3), expected))
    assert (rng_kept, float(final.calls)) == (True, calls), "finalize's check moved the caller's RNG or a buffer"


def test_removing_a_node_reads_its_name_under_its_own_graph_only():
    """Two traced children with the same inner names: removing ``b.act_tl1`` leaves ``a``'s node
    (cut by ``a``'s prefix length, the name would read ``act_tl1`` in ``a``'s graph too)."""
    from sparsify.deploy.plain_modules import _remove_node

    def block():
        return fx.symbolic_trace(nn.Sequential(OrderedDict(fc=nn.Linear(2, 2), act_tl1=nn.ReLU())))

    root = nn.Module()
    root.a, root.b = block(), block()
    assert _remove_node(root, ["a", "b"], "b.act_tl1")
    called = {p: [n.target for n in root.get_submodule(p).graph.nodes if n.op == "call_module"] for p in "ab"}
    assert called == {"a": ["fc", "act_tl1"], "b": ["fc"]}
    assert not _remove_node(root, ["a", "b"], "c.act_tl1")


# --- compare --------------------------------------------------------------------------------

def test_outputs_close_gives_tiny_outputs_the_absolute_tolerance():
    """Outputs near zero agree within atol (not a tolerance shrunk by their own tiny magnitude)."""
    a = torch.full((4,), 1e-3)
    assert outputs_close(a, a + 5e-6)[0] is True, "1e-3 vs 1e-3 + 5e-6 is within atol=1e-5"
    assert outputs_close(torch.zeros(4), torch.full((4,), 5e-6))[0] is True, "0 vs 5e-6 is within atol=1e-5"
    assert outputs_close(torch.zeros(4), torch.full((4,), 5e-5))[0] is False  # beyond atol: still caught


def test_outputs_close_refuses_other_shapes_and_other_output_counts():
    """Outputs of another shape, or another number of outputs, never count as the same output."""
    assert outputs_close(torch.ones(1, 3), torch.ones(2, 3)) == (False, float("inf"))
    a, b = torch.ones(3), torch.zeros(2)
    assert outputs_close([a, b], [a]) == (False, float("inf"))
    assert outputs_close([a], [a, b]) == (False, float("inf"))


def test_outputs_close_needs_every_output_to_agree():
    """A difference in the first of several outputs is a difference (a later agreeing one hides nothing)."""
    a, b = torch.ones(3), torch.arange(3.0)
    ok, worst = outputs_close([a, b], [a + 1, b])
    assert ok is False and worst == pytest.approx(1.0)


class ClassIds(nn.Module):
    """A classifier that returns class ids only; its bias makes class 0 win for every input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))

    def forward(self, x):
        return self.fc(x).argmax(-1)


def _finalize_warnings(batch: int) -> list[str]:
    x = torch.rand(batch, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(ClassIds(), "gmp", sparsity=0.5, begin=0, end=0, example_inputs=(x,))
        final = sparsify.finalize(m, (x,))
    assert (final(x) == 0).all() and (final(x.roll(1, -1)) == 0).all()  # the same id for different inputs
    return [str(w.message) for w in caught]


def test_integer_only_outputs_are_not_taken_for_a_model_ignoring_its_input():
    """A classifier returning only equal class ids for a batch is not said to ignore its input."""
    x = (torch.tensor([[1.0], [2.0]]),)
    assert answered_alike(x, torch.zeros(2, dtype=torch.long)) == 0
    assert answered_alike(x, torch.zeros(2, 3)) == 2  # a floating output answered alike: said
    assert not [w for w in _finalize_warnings(2) if IGNORES_INPUT in w]


def test_same_outputs_compares_floating_tensors_only_and_needs_some():
    """At batch 1, a classifier returning one class id for the input and its rolled copy is not said to ignore it."""
    assert same_outputs(torch.tensor([1]), torch.tensor([1])) is False
    assert same_outputs(torch.ones(2), torch.ones(2)) is True
    assert not [w for w in _finalize_warnings(1) if IGNORES_INPUT in w]


class HugeBias(nn.Module):
    """An untrained head beside a bias so large that float32 rounds its input-dependent part away."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.bias.fill_(1e9)

    def forward(self, x):
        return self.fc(x)


def test_outputs_rounded_alike_that_still_depend_on_the_input_are_not_said_to_ignore_it():
    """Both samples give the same output (the bias swallows the rest), but the output has a gradient
    with respect to the input: the model is not cut off from it, and finalize does not say it is."""
    torch.manual_seed(0)
    x = torch.rand(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(HugeBias(), "gmp", sparsity=0.5, begin=0, end=0, example_inputs=(x,))
        final = sparsify.finalize(m, (x,))
    assert torch.equal(final(x)[0], final(x)[1])  # the premise: answered alike
    assert not [str(w.message) for w in caught if IGNORES_INPUT in str(w.message)]


def test_a_zero_tolerance_is_a_tolerance():
    """finalize's rtol and atol are finite numbers >= 0: 0 asks for exact equality, and is taken."""
    for rtol, atol in [(0, 0), (0.0, 1e-5), (1e-4, 0.0)]:
        check_options(True, rtol, atol, False, False)
    with pytest.raises(ValueError, match="atol is a tolerance, a finite number >= 0; got -1e-09"):
        check_options(True, 0, -1e-9, False, False)


# --- serialize ------------------------------------------------------------------------------

def test_compact_bitmask_order_is_the_file_format():
    """Files written by earlier versions load: the first entry of each byte is its highest bit."""
    stored = compact_state_dict({"w": torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])})
    assert stored["format"] == FORMAT
    assert stored["sparse"]["w"]["bitmask"].tolist() == [128]
    written_before = {"format": FORMAT, "order": ["w"], "dense": {}, "sparse": {"w": {
        "shape": [2, 8], "bitmask": torch.tensor([0b10000001, 0b01000000], dtype=torch.uint8),
        "values": torch.tensor([1.0, 2.0, 3.0])}}}
    expected = torch.zeros(2, 8)
    expected[0, 0], expected[0, 7], expected[1, 1] = 1.0, 2.0, 3.0
    assert torch.equal(expand_state_dict(written_before)["w"], expected)


class Payload:
    """Stands for arbitrary pickled code in a file."""


def test_load_refuses_a_file_holding_arbitrary_objects(tmp_path):
    """load reads weights only: a file in the compact format holding a pickled object is refused."""
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "order": [], "dense": {"x": Payload()}, "sparse": {}}, path)
    with pytest.raises(pickle.UnpicklingError):
        load(path)


# --- divergence -----------------------------------------------------------------------------

class ScaleThenReLUInPlace(nn.Module):
    """The root's own op scales the input; a layer reads it, then an in-place ReLU rewrites it."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = x * self.k
        return self.lin(h), self.act(h)


def test_an_in_place_op_after_a_call_does_not_move_the_blame():
    """The root's changed code is named where outputs part, even when an in-place op later rewrites what a layer read."""
    a = fx.symbolic_trace(ScaleThenReLUInPlace(2.0))
    b = fx.symbolic_trace(ScaleThenReLUInPlace(2.01))
    b.lin = a.lin
    x = -torch.rand(3, 4) - 0.1  # all negative: the ReLU zeroes h in both models
    d = locate_divergence(a, b, (x,))
    assert [n for n, _ in d.own] == [""], d
    assert [n for n, _ in d.changed] == [""] and not d.amplified_only, d


def test_a_parameter_the_finalized_model_lacks_is_not_a_difference():
    """A parameter finalize removed is not blamed as one finalize changed."""
    source, final = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Identity())
    assert _differs(source, final, "0.weight") is False
    other = nn.Sequential(nn.Linear(2, 2))
    assert _differs(source, other, "0.weight") is True


# --- official -------------------------------------------------------------------------------

def test_st3_layer_with_a_partly_non_zero_bias_keeps_it_with_a_warning():
    """to_official_state_dict keeps an ST-3 bias that is non-zero anywhere, and warns about it."""
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 3)), "st3", sparsity=0.5, begin=0, end=0, fix=None)
    name, layer = next((n, mod) for n, mod in m.named_modules() if isinstance(mod, ST3Mixin))
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    with pytest.warns(UserWarning, match="non-zero bias"):
        sd = to_official_state_dict(m)
    assert torch.equal(sd[f"{name}.bias"], torch.tensor([0.0, 1.0, 0.0]))


# --- accelerate -----------------------------------------------------------------------------

def _trained_bn(c, shift):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.fill_(shift)
        bn.running_mean.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


def test_patch_skip_with_fused_relu_holds_relu_of_bn_zero_at_skipped_positions():
    """A patch-skipping conv with BN and ReLU fused computes relu(bn(conv(x) * keep)), also where BN(0) < 0."""
    conv, bn = nn.Conv2d(3, 4, 3, padding=1).eval(), _trained_bn(4, -1.0)
    keep = torch.rand(6, 6) > 0.4
    keep[0, 0] = False
    fast = PatchSkipConv2d.from_conv(conv, keep, bn, input_hw=(6, 6))
    fast.relu = True
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert (fast.skip_value < 0).all()  # the case: BN(0) is negative
        expected = F.relu(bn(conv(x) * keep))
        got = fast(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), f"max |diff| {float((got - expected).abs().max())}"


@pytest.mark.parametrize("stride", [(1, 2), (2, 1)])
def test_patch_skip_conv_with_different_strides_per_axis(stride):
    """A patch-skipping conv strided differently in height and width equals the masked conv then BN."""
    conv = nn.Conv2d(3, 4, 3, stride, 1).eval()
    bn = _trained_bn(4, 0.3)
    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        y = conv(x)
        keep = torch.rand(y.shape[-2:]) > 0.4
        keep[0, 0] = False
        expected = bn(y * keep)
        got = PatchSkipConv2d.from_conv(conv, keep, bn, input_hw=(9, 10))(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), f"max |diff| {float((got - expected).abs().max())}"


@pytest.mark.skipif(not onednn_available(), reason="the packed-weight path needs oneDNN")
def test_gemm_sees_a_weight_changed_in_place():
    """A weight changed in place (same storage) is re-packed: gemm computes with the new values."""
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    cache = PackCache()
    with torch.no_grad():
        assert torch.allclose(gemm(x, w, b, cache), F.linear(x, w, b), atol=1e-5)
        w.mul_(2)
        got = gemm(x, w, b, cache)
    assert torch.allclose(got, F.linear(x, w, b), atol=1e-5), "gemm used the weight packed before the change"


class ConvCalledTwice(nn.Module):
    """One conv called from two places; only one call is followed by a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _trained_bn(4, 0.5)

    def forward(self, x, y):
        return self.bn(self.conv(x)) + self.conv(y)


def test_accelerate_does_not_fold_bn_into_a_conv_called_elsewhere_too():
    """accelerate keeps a conv shared by two calls unfolded: the call without BN still computes conv(y)."""
    gm = fx.symbolic_trace(ConvCalledTwice().eval())
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    fast = accelerate(gm, (x, y), decide="never", check=False)
    with torch.no_grad():
        ok, worst = outputs_close(gm(x, y), fast(x, y))
    assert ok, f"the accelerated model's output differs (relative {worst:.3g})"
    assert fast.acceleration.folded_bn == 0


# -- 2:4 semi-structured emission: the per-layer decisions, without the CUDA kernels ---------------

class AttentionAndOdd(nn.Module):
    """An attention block (its out_proj a Linear subclass), a Linear of 6 inputs and a plain Linear."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.odd = nn.Linear(6, 16)
        self.fc = nn.Linear(16, 16)


def test_semi_structured_takes_plain_linears_only_and_strict_names_the_first_dense_one(monkeypatch):
    """to_semi_structured leaves attention's out_proj to its module, says why each Linear stays dense, and strict refuses."""
    from sparsify.deploy import semistructured24
    monkeypatch.setattr(semistructured24, "semi_structured_available", lambda device: (True, ""))
    m = semistructured24.to_semi_structured(AttentionAndOdd())
    assert "attn.out_proj" not in m.semi_structured  # MultiheadAttention reads out_proj.weight itself
    assert set(m.semi_structured) == {"odd", "fc"}
    assert all(v.startswith("dense: weight is torch.float32 on cpu") for v in m.semi_structured.values())
    with pytest.raises(semistructured24.SemiStructuredError, match=r"^odd: dense: weight is torch.float32"):
        semistructured24.to_semi_structured(AttentionAndOdd(), strict=True)


def test_a_width_not_a_multiple_of_four_is_not_two_four():
    """A weight of 6 inputs is never taken for 2:4, even where its flat groups of 4 would pass."""
    from sparsify.deploy.semistructured24 import _two_four
    w = torch.tensor([[1.0, 0, 0, 0, 0, 1], [1.0, 0, 0, 0, 0, 1]])  # flat groups of 4: 1, 2, 1 non-zeros
    assert _two_four(w) is False
    assert _two_four(torch.tensor([[1.0, 0, 1, 0, 0, 1, 0, 1]])) is True


@pytest.mark.parametrize("recipe", ["st3", "gmp", "sas"])
def test_finalize_keeps_a_channels_last_models_weight_layout(recipe):
    """A model moved to channels_last finalized to contiguous conv weights under st3, gmp (the
    deployed weight computed from masks) and SAS (its wide weight made contiguous at sparsify):
    the deployed convolutions ran in another layout than the model was set up for."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 10 * 10, 4)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(net, recipe, example_inputs=(x,), total_steps=4)
        opt = torch.optim.SGD(sparsify.param_groups(m), lr=0.01)
        for _ in range(4):
            loss = m(x).square().mean() + sparsify.penalty(m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m, loss)
        final = sparsify.finalize(m)
    layouts = {n: p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for n, p in final.named_parameters() if p.dim() == 4}
    assert len(layouts) == 3 and all(layouts.values()), layouts


class _Overflowing(nn.Module):
    """Finite parameters, an output of NaN: inf - inf after the activations overflow."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        big = self.fc(x) * 1e30 * 1e30
        return big - big


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_outputs_with_finite_parameters_are_refused_with_their_cause(dtype):
    """A model held in float16 overflows on its own (a dense resnet18 in float16 answers NaN in eval
    after three SGD steps on the CPU): it was told its training diverged and to lower the learning rate."""
    x = torch.randn(2, 4, dtype=dtype)
    m = sparsify.sparsify(_Overflowing().to(dtype), "gmp", total_steps=4, example_inputs=x)
    said = (r"it computes in float16, whose range \(65504\) an activation exceeded" if dtype == torch.float16 else
            r"an activation overflowed \(weights grown too large: lower the learning rate\)")
    with pytest.raises(sparsify.FinalizeError, match=said):
        sparsify.finalize(m)
