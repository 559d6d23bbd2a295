"""SAS, STR and ST-3 edges that a one-line change would silently alter (second pass): SAS's kept
slots when a recompute-free layer is followed by another, the official bias bound of a layer built
directly, a frozen layer staying frozen, the deployed copy of a non-zero padding mode, a value on a
signed-levels boundary keeping its slot, the level scale and its zero refusal, an in-place relu
whose input is read again, init 'auto' on an as-is relu input, not_relu='as_is', the recompute and
through_average defaults; STR's global layer before its group, s_init = 0 refused, a threshold at 0 not reported
as undecayed, a grouped ConvTranspose at layer granularity; ST-3's fix at the ramp's end, the steps
it writes weights on, its 'fixed' phase, a threshold set back to 0, an EMA copy taken after the fix."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsify
from sparsify.methods.sas.layer import SASConv1d, SASConv2d, SASLinear
from sparsify.methods.sas.rules import SignedLevelsRule

from model_parts import only, only_group
from warned import said, warned


def recipe(method, match="Linear", options=None, **params):
    out = {"version": 1, "rules": [{"match": {"type": match}, "method": method, "params": params}]}
    if options:
        out["options"] = options
    return out








# ---------------------------------------------------------------------------------------------
# SAS
# ---------------------------------------------------------------------------------------------

def _grads(layers, x, forward):
    for p in (q for layer in layers for q in layer.parameters()):
        p.grad = None
    h = x
    for layer in layers:
        h = forward(layer, h)
    h.square().sum().backward()
    return [p.grad.clone() for layer in layers for p in layer.parameters()]


def test_sas_layers_keeping_their_slots_keep_their_own_copy():
    """recompute=False keeps a private copy of the slots: a following SAS layer (same shapes, the
    shared workspace) does not overwrite them before the backward."""
    torch.manual_seed(0)
    layers = [SASLinear(8, 8, recompute=False), SASLinear(8, 8, recompute=False)]
    x = torch.randn(4, 8)
    fast = _grads(layers, x, lambda layer, h: layer(h))
    ref = _grads(layers, x, lambda layer, h: layer.reference_forward(h))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)


def test_sas_layer_built_directly_draws_its_bias_from_the_narrow_fan_in():
    """The official SASConv2d initialisation: the bias bound is 1/sqrt(narrow fan-in), not that of
    the m-times wider weight."""
    torch.manual_seed(0)
    layer = SASConv2d(8, 512, 3)
    bound = 1 / math.sqrt(8 * 9)
    b = layer.bias.detach().abs()
    assert float(b.max()) <= bound
    assert float(b.max()) > 0.9 * bound  # 512 draws reach near the bound, past 1/sqrt(16·9)


def test_sas_keeps_a_frozen_layer_frozen():
    """A frozen layer that the recipe includes (options.frozen = include) becomes a SAS layer whose
    wide weight still requires no gradient."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    net[2].weight.requires_grad_(False)
    m = sparsify.sparsify(net, recipe("sas", options={"frozen": "include"}),
                          example_inputs=torch.randn(2, 8), total_steps=4)
    layer = [mod for mod in m.modules() if isinstance(mod, SASLinear)][-1]
    assert layer.weight.shape == (4, 16)
    assert not layer.weight.requires_grad


def test_sas_deployed_copy_of_a_reflect_padded_conv_computes_the_same():
    """padding_mode='reflect': the deployed plain-ops module pads once (reflect) and convolves
    without further zero padding, as the training layer does."""
    torch.manual_seed(0)
    layer = SASConv1d(4, 6, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer.deploy_module()(x), layer(x))


def test_signed_levels_value_on_a_level_goes_to_the_lower_slot():
    """A magnitude exactly on a level belongs to the band below it (bands are (lo, hi]): it is
    never dropped from every slot."""
    r = SignedLevelsRule(4)
    level = r.pos_levels[0]
    x = torch.tensor([level, -r.neg_levels[0]])
    slots = torch.stack(r.slots(x))
    torch.testing.assert_close(slots.sum(0), x.abs())
    assert slots[0, 0] == x[0] and slots[2, 1] == -x[1]


def test_signed_levels_scale_moves_both_sides_levels():
    """slot_options scale stretches the positive and the non-positive levels alike: with scale 2,
    ±1.0 lies in the lowest band on both sides (the unit levels are at 0.674)."""
    r = SignedLevelsRule(4, scale=2.0)
    assert r.pos_levels == r.neg_levels
    assert abs(r.pos_levels[0] - 2 * 0.6744897501960817) < 1e-12
    slots = torch.stack(r.slots(torch.tensor([1.0, -1.0])))
    torch.testing.assert_close(slots, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_signed_levels_refuses_a_zero_scale():
    """scale must be positive: 0 would put every level at 0 (one band per side) and is refused,
    by the rule and by the recipe check."""
    with pytest.raises(ValueError, match="scale must be a positive number"):
        SignedLevelsRule(4, scale=0)
    with pytest.raises(Exception, match="scale must be a positive number"):
        sparsify.sparsify(nn.Sequential(nn.ReLU(), nn.Linear(4, 2)),
                          recipe("sas", m=4, slot_options={"scale": 0.0}),
                          example_inputs=torch.randn(2, 4), total_steps=4)


class _InPlaceReluReadAgain(nn.Module):
    """An in-place relu whose input is read again after it (so that read sees relu'd values)."""

    def __init__(self):
        super().__init__()
        self.a, self.relu, self.b = nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        r = self.relu(h)
        return self.b(r) + h.sum(-1, keepdim=True)


def test_sas_rewiring_an_in_place_relu_keeps_later_reads_of_its_input_relud():
    """The rewired in-place relu becomes out of place; a later read of its input, which saw the
    relu'd tensor, now reads the relu's output: the model computes what it did."""
    torch.manual_seed(0)
    net, x = _InPlaceReluReadAgain(), torch.randn(3, 8)
    with torch.no_grad():
        ref = net(x)
    m = sparsify.sparsify(net, "sas", example_inputs=x, total_steps=4)
    assert isinstance(m.b, SASLinear) and "rewired" in m.b.sas_input
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


def test_sas_as_is_on_a_relu_output_starts_with_the_official_zero_negative_slots():
    """input='as_is' on a layer fed by a relu: init 'auto' sees a non-negative input and gives
    the relu coefficients (negative slot weights zero, the official converter), and says so."""
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(2, 4)
    m = sparsify.sparsify(net, recipe("sas", input="as_is"), example_inputs=x, total_steps=4)
    layer = m.get_submodule("2")
    assert layer.sas_input == "as is (input is a relu output)"
    assert layer.sas_coefficients == [1.0, 0.0]
    assert not layer.weight[:, 1::2].any()


def test_sas_not_relu_as_is_converts_layers_without_a_relu_and_keeps_their_function():
    """not_relu='as_is': a layer whose input is no relu output is converted as is (identity
    coefficients), so the model computes what it did; with the default 'dense' it stays dense."""
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        ref = net(x)
    m = sparsify.sparsify(net, recipe("sas", not_relu="as_is"), example_inputs=x, total_steps=4)
    layers = [mod for mod in m.modules() if isinstance(mod, SASLinear)]
    assert len(layers) == 2 and all(layer.sas_input == "as is" for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


def test_sas_recipe_recomputes_the_slots_by_default():
    """recompute defaults to true: the layer keeps only its input for the backward (the slots are
    recomputed), recompute=false keeps the slots."""
    net, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(2, 4)
    m = sparsify.sparsify(net, "sas", example_inputs=x, total_steps=4)
    assert only(m, SASLinear).sas_recompute is True
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    m = sparsify.sparsify(net, recipe("sas", recompute=False), example_inputs=x, total_steps=4)
    assert only(m, SASLinear).sas_recompute is False


def test_sas_does_not_look_through_average_pooling_by_default():
    """through_average defaults to false: a head fed by relu -> average pool -> flatten is not
    rewired (that would change the function) and stays dense; through_average=true rewires it."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    x = torch.randn(2, 3, 6, 6)
    m = sparsify.sparsify(net(), recipe("sas", not_relu="dense"), example_inputs=x, total_steps=4)
    assert not any(isinstance(mod, SASLinear) for mod in m.modules())
    m = sparsify.sparsify(net(), recipe("sas", through_average=True), example_inputs=x, total_steps=4)
    assert "rewired" in only(m, SASLinear).sas_input


# ---------------------------------------------------------------------------------------------
# STR
# ---------------------------------------------------------------------------------------------

def test_str_global_layer_computes_with_s_init_until_its_group_owns_the_threshold():
    """A global-granularity layer made before its group exists (shape propagation at build time)
    thresholds at sigmoid(s_init): near-dense, not at sigmoid(0) = 0.5."""
    from sparsify.methods.str import STR_CLASSES
    torch.manual_seed(0)
    layer = STR_CLASSES[nn.Linear].from_dense(nn.Linear(16, 8), granularity="global", s_init=-10.0)
    torch.testing.assert_close(layer.threshold(), torch.sigmoid(torch.tensor(-10.0)))
    x = torch.randn(3, 16)
    with torch.no_grad():
        dense = nn.functional.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), dense, atol=1e-3, rtol=0)


def _str_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def test_str_refuses_s_init_zero_and_takes_a_negative_one():
    """s_init must be < 0: 0 (threshold 0.5, above nearly every initialised weight) and positive
    values are refused; a negative one starts at threshold sigmoid(s_init)."""
    m = sparsify.sparsify(_str_cnn(), "str", s_init=-1.0, example_inputs=torch.randn(2, 3, 8, 8))
    for layer in m.modules():
        if hasattr(layer, "threshold_param"):
            torch.testing.assert_close(layer.threshold(), torch.sigmoid(torch.tensor([-1.0])))
    for s_init in (0.0, 0.5):
        with pytest.raises(sparsify.RecipeError, match=f"s_init: {s_init} prunes every weight"):
            sparsify.sparsify(_str_cnn(), "str", s_init=s_init, example_inputs=torch.randn(2, 3, 8, 8))


def _str_at_zero():
    """An STR model whose threshold parameters sit at s = 0 (reached in training; s_init refuses it)."""
    m = sparsify.sparsify(_str_cnn(), "str", s_init=-1.0, example_inputs=torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        for layer in m.modules():
            if hasattr(layer, "threshold_param"):
                layer.threshold_param().zero_()
    return m


def test_str_threshold_resting_at_zero_is_not_reported_as_undecayed():
    """A threshold s = 0 that does not move under a hand-written update with decay is decay's
    fixed point, not a missing decay: no 'did not move' warning."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    m = _str_at_zero()
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4) % 5
    messages = []
    for _ in range(3):
        loss = F.cross_entropy(m(x), y)
        for p in m.parameters():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.01 * ((0 if p.grad is None else p.grad) + 0.1 * p)
        messages += said(sparsify.step, m)
    assert all(float(layer.s) == 0.0 for layer in m.modules() if hasattr(layer, "threshold_param"))
    assert not any("did not move" in s for s in messages), messages


def test_str_grouped_conv_transpose_is_converted_with_one_threshold_per_layer():
    """A grouped ConvTranspose keeps its output channels across two weight dimensions: STR with
    per-layer thresholds converts it, per-channel thresholds leave it dense."""
    from sparsify.methods.str import STRMixin

    def net():
        return nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2))

    x = torch.randn(1, 4, 5, 5)
    m = sparsify.sparsify(net(), recipe("str", match="ConvTranspose2d"), example_inputs=x)
    assert any(isinstance(mod, STRMixin) for mod in m.modules())
    dense, _ = warned(sparsify.sparsify, net(), recipe("str", match="ConvTranspose2d", granularity="channel"),
                      example_inputs=x)
    assert not any(isinstance(mod, STRMixin) for mod in dense.modules())


# ---------------------------------------------------------------------------------------------
# ST-3
# ---------------------------------------------------------------------------------------------

def _st3_steps(steps, **params):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    m = sparsify.sparsify(net, recipe("st3", min_density=0, **params), example_inputs=torch.randn(2, 16))
    messages = []
    for _ in range(steps):
        messages += said(sparsify.step, m)
    return m, messages


def test_st3_fix_at_the_ramps_end_is_not_called_early():
    """fix == end: the fix applies the ramp's own final ratio, nothing to warn about; fix < end
    is told that the final sparsity was applied at the fix."""
    m, messages = _st3_steps(5, sparsity=0.5, begin=0, end=3, fix=3)
    assert all(bool(layer.fixed) for layer in m.modules() if hasattr(layer, "fixed"))
    assert only_group(m).warnings() == [] and not any("before the ramp's end" in s for s in messages)
    m, messages = _st3_steps(5, sparsity=0.5, begin=0, end=4, fix=2)
    assert any("before the ramp's end" in s for s in only_group(m).warnings() + messages)


def test_st3_writes_weights_only_at_its_fix_and_shares_them_until_then():
    """ST-3 writes its layers' weights only on the fix step: sparsify() leaves the sparse model
    sharing the caller's weight tensors, and once every layer is fixed nothing is written."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    m = sparsify.sparsify(net, recipe("st3", sparsity=0.5, begin=0, end=2, fix=3, min_density=0),
                          example_inputs=torch.randn(2, 16))
    layers = [layer for layer in m.modules() if hasattr(layer, "fixed")]
    assert layers[0].weight.data_ptr() == net[0].weight.data_ptr()
    g = only_group(m)
    assert [g.writes_weights(t) for t in (0, 1, 2, 3, 4)] == [False, False, False, True, True]
    for _ in range(4):
        sparsify.step(m)
    assert all(bool(layer.fixed) for layer in layers)
    assert not g.writes_weights(4) and not g.writes_weights(10)


def test_st3_describes_the_fix_step_as_fixed():
    """The phase is 'fixed' from the fix step on (also on the fix step itself), 'hold' between
    the ramp's end and the fix."""
    net = nn.Sequential(nn.Linear(16, 4))
    m = sparsify.sparsify(net, recipe("st3", sparsity=0.5, begin=1, end=2, fix=4, min_density=0),
                          example_inputs=torch.randn(2, 16))
    assert [only_group(m).describe(t)["phase"] for t in (0, 1, 2, 3, 4, 5)] == \
        ["dense", "ramp", "hold", "hold", "fixed", "fixed"]



def test_st3_layer_set_back_to_a_non_positive_threshold_is_dense_again():
    """τ <= 0 means dense: a layer whose threshold goes from positive back to 0 drops its mask
    and scale and computes with its plain weight."""
    from sparsify.methods.st3 import ST3_CLASSES
    torch.manual_seed(0)
    layer = ST3_CLASSES[nn.Linear].from_dense(nn.Linear(16, 4))
    layer.set_threshold(0.1)
    assert not bool(layer.mask.all())
    layer.set_threshold(0.0)
    assert float(layer.tau) == 0.0 and bool(layer.mask.all()) and bool((layer.scale == 1).all())
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_st3_averaged_copy_made_after_the_fix_is_not_baked_twice():
    """An EMA copy taken after the fix holds baked weights W ⊙ M already: syncing it with the
    training model keeps its averaged weights (no second shrink by τ and rescale)."""
    import copy
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    m = sparsify.sparsify(net, recipe("st3", sparsity=0.5, begin=0, end=1, fix=1, min_density=0),
                          example_inputs=torch.randn(2, 16))
    sparsify.step(m)
    layers = [layer for layer in m.modules() if hasattr(layer, "fixed")]
    assert all(bool(layer.fixed) for layer in layers)
    ema = copy.deepcopy(m)
    with torch.no_grad():  # a training step, then the averaging tool's update of the copy
        for layer in layers:
            layer.weight.add_(0.01 * layer.mask)
        for a, b in zip(ema.parameters(), m.parameters()):
            a.mul_(0.9).add_(0.1 * b)
    sparsify.step(m)
    expected = [layer.weight.detach().clone() for layer in ema.modules() if hasattr(layer, "fixed")]
    sparsify.sync(ema, m)
    for layer, w in zip([layer for layer in ema.modules() if hasattr(layer, "fixed")], expected):
        torch.testing.assert_close(layer.weight.detach(), w)
