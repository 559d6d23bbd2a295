"""STR (docs/methods/str.md): oracles, granularities, float32 thresholds, optimizer plumbing, warning."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.methods.str import STRMixin, str_weight
from sparsify.prepare.recipe import RecipeError

from loops import run_steps


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def make(granularity="layer", s_init=-10.0, model=None, **kw):
    model = model or small_cnn()
    return sparsify.sparsify(model, "str", granularity=granularity, s_init=s_init,
                             example_inputs=torch.randn(2, 3, 8, 8), **kw)


def str_layers(m):
    return [mod for mod in m.modules() if isinstance(mod, STRMixin)]


def train(m, opt, steps=3, x=None):
    x = torch.randn(4, 3, 8, 8) if x is None else x
    run_steps(m, opt, [(x, torch.arange(4) % 5)] * steps)


def test_paper_init_is_exactly_dense_and_s_gets_no_loss_gradient():
    dense = nn.Conv2d(4, 6, 3)
    m = sparsify.sparsify(nn.Sequential(dense), "str", s_init=-3200.0, example_inputs=torch.randn(1, 4, 5, 5))
    (layer,) = str_layers(m)
    x = torch.randn(2, 4, 5, 5)
    out = layer(x)
    out.square().sum().backward()
    w = dense.weight.detach().clone().requires_grad_(True)
    ref = F.conv2d(x, w, dense.bias)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(layer.weight.grad, w.grad)
    assert layer.s.grad is not None and float(layer.s.grad) == 0.0


def test_weight_gradient_is_masked_by_the_threshold():
    w = torch.tensor([0.5, -0.05, -0.3, 0.02], requires_grad=True)
    str_weight(w, torch.tensor(0.1)).sum().backward()
    assert w.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_finite_difference_of_s_in_float64():
    torch.manual_seed(1)
    lin = nn.Linear(6, 3).double()
    with torch.no_grad():
        lin.weight.mul_(4)  # some weights on both sides of the threshold
    s0 = torch.logit(torch.tensor(0.05, dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64)

    def loss(s):
        thr = torch.sigmoid(s)
        w = torch.sign(lin.weight) * torch.relu(lin.weight.abs() - thr)
        return F.linear(x, w, lin.bias).sin().sum()

    m = sparsify.sparsify(nn.Sequential(lin), "str", example_inputs=x)
    (layer,) = str_layers(m)
    with torch.no_grad():
        layer.s.fill_(float(s0))
    # the layer's own forward (float32 sigmoid by design) against the float64 closed form
    layer(x).sin().sum().backward()
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(s0 + eps) - loss(s0 - eps)) / (2 * eps)
    assert abs(float(layer.s.grad) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd)))
    assert abs(float(fd)) > 1e-3  # the check is not vacuous


def test_reported_sparsity_is_the_fraction_of_zero_effective_weights():
    m = make(s_init=-3.0)  # sigmoid(-3) = 0.047: prunes part of each layer at step 0
    rep = sparsify.report(m)
    for row, layer in zip(rep.layers, str_layers(m)):
        w_hat = layer.effective_weight().detach()
        assert row.weight_sparsity == pytest.approx(float((w_hat == 0).float().mean()))
    assert 0 < rep.totals["weight_sparsity"] < 1
    assert rep.layers[0].extra["threshold"] == pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))


@pytest.mark.parametrize("granularity", ["layer", "channel", "global"])
def test_report_counts_the_finalized_model_and_names_the_thresholds_it_leaves_out(granularity):
    """report's "whole model" count is the model finalize ships, without STR's thresholds; it said
    so nowhere, and docs tables counting the training model's parameters read 4 more for one model."""
    m = make(granularity)
    thresholds = sum(p.numel() for n, p in m.named_parameters() if n.endswith(".s") or n == "s")
    rep = sparsify.report(m)
    shipped = sum(p.numel() for p in sparsify.finalize(m).parameters())
    assert rep.totals["params"] == shipped == sum(p.numel() for p in m.parameters()) - thresholds
    assert rep.totals["method_params"] == {"str": thresholds}
    assert (f"of {shipped:,} parameters non-zero, as finalize ships it (without the {thresholds:,} "
            f"parameter{'s' * (thresholds > 1)} str trains besides the weights)") in str(rep)
    dense = sparsify.report(sparsify.sparsify(small_cnn(), "st3", total_steps=4, example_inputs=torch.zeros(1, 3, 8, 8)))
    assert dense.totals["method_params"] == {} and "as finalize ships it" not in str(dense)


def test_reported_threshold_mean_is_the_mean_over_the_layers():
    m = make(s_init=-3.0)
    with torch.no_grad():
        for i, layer in enumerate(str_layers(m)):
            layer.s.fill_(-3.0 + i)
    (g,) = sparsify.api.find_state(m).groups.values()
    expected = [float(torch.sigmoid(torch.tensor(-3.0 + i))) for i in range(len(str_layers(m)))]
    assert g.describe(0)["threshold_mean"] == pytest.approx(sum(expected) / len(expected))


def test_channel_granularity_has_one_threshold_per_output_channel():
    m = make("channel")
    conv, lin = str_layers(m)[0], str_layers(m)[-1]
    assert conv.s.shape == (8, 1, 1, 1) and lin.s.shape == (5, 1)
    with torch.no_grad():
        conv.s[0] = 5.0  # sigmoid(5) = 0.99: channel 0 fully pruned, the others dense
    w = conv.effective_weight()
    assert bool((w[0] == 0).all()) and bool((w[1:] != 0).all())


def test_global_threshold_is_one_parameter_shared_by_every_layer():
    m = make("global")
    names = [n for n, _ in m.named_parameters() if n.endswith(".s") or n == "s"]
    assert names == ["sparsify_state.groups.rule0_str.s"]
    (group,) = sparsify.api.find_state(m).groups.values()
    assert all(layer.threshold_param() is group.s for layer in str_layers(m))
    with torch.no_grad():
        group.s.fill_(0.0)  # threshold 0.5 everywhere
    for layer in str_layers(m):
        assert torch.equal(layer.effective_weight(), str_weight(layer.weight, torch.tensor(0.5)))
    # the shared parameter receives the gradient of every layer
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    assert group.s.grad is not None
    # finalize (a deep copy) keeps computing with the copy's shared threshold
    final = sparsify.finalize(m)
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    assert torch.allclose(final(x), m(x), atol=1e-6)


def test_param_groups_decay_thresholds_and_threshold_decay_overrides():
    m = make()
    groups = sparsify.param_groups(m, 1e-4, no_decay=("s",))  # STR's group claims s first
    s_ids = {id(layer.s) for layer in str_layers(m)}
    (g,) = [g for g in groups if {id(p) for p in g["params"]} & s_ids]
    assert {id(p) for p in g["params"]} == s_ids and g["weight_decay"] == 1e-4
    m2 = make(threshold_decay=0.05)
    s2 = {id(layer.s) for layer in str_layers(m2)}
    g2 = [g for g in sparsify.param_groups(m2, 1e-4) if {id(p) for p in g["params"]} & s2]
    assert [g["weight_decay"] for g in g2] == [0.05]
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(m.parameters()))


def test_weight_decay_on_s_raises_the_threshold_and_the_sparsity():
    m = make(s_init=-3.0)
    s_opt = torch.optim.SGD([p for l in str_layers(m) for p in [l.s]], lr=1.0, weight_decay=0.3)
    before = sparsify.report(m).totals["weight_sparsity"]
    x = torch.randn(4, 3, 8, 8)
    for _ in range(5):
        s_opt.zero_grad()
        (m(x).sum() * 0).backward()  # no loss gradient: decay alone moves s toward 0
        s_opt.step()  # W is not stepped
        sparsify.step(m)
    after = sparsify.report(m).totals["weight_sparsity"]
    assert all(float(l.s.detach()) == pytest.approx(-3.0 * 0.7 ** 5) for l in str_layers(m))
    assert after > before + 0.1


def test_warns_once_when_the_optimizer_does_not_decay_s():
    m = make()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)  # no weight decay at all
    with pytest.warns(UserWarning, match="no weight decay to the thresholds"):
        train(m, opt, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(m, opt, steps=2)  # warned once


def test_no_warning_with_param_groups():
    m = make("global")
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(m, opt, steps=2)


def test_warns_for_a_hand_written_update_that_never_moves_a_dead_threshold():
    m = make(s_init=-3200.0)  # sigmoid(s) == 0: no loss gradient, only decay could move s
    weights = [p for n, p in m.named_parameters() if not n.endswith(".s")]
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4) % 5
    with pytest.warns(UserWarning, match="did not move"):
        for _ in range(2):
            loss = F.cross_entropy(m(x), y)
            for p in m.parameters():
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in weights:
                    p -= 0.01 * p.grad
            sparsify.step(m)


def test_threshold_stays_float32_under_autocast_and_half():
    m = make()
    layer = str_layers(m)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.threshold().dtype == torch.float32
        out = m(torch.randn(2, 3, 8, 8))
        assert out.dtype == torch.bfloat16
    m.half()
    assert layer.threshold().dtype == torch.float32
    assert layer.effective_weight().dtype == torch.float16


def test_rejects_the_official_repos_s_init_100():
    with pytest.raises(RecipeError, match="prunes everything"):
        sparsify.sparsify(small_cnn(), "str", s_init=100)
    with pytest.raises(RecipeError, match="granularity"):
        sparsify.sparsify(small_cnn(), "str", granularity="filter")


def test_builtin_recipes_train_and_finalize():
    for recipe in ("str", "str-global"):
        m = sparsify.sparsify(small_cnn(), recipe, s_init=-2.0, example_inputs=torch.randn(2, 3, 8, 8))
        train(m, torch.optim.SGD(sparsify.param_groups(m, 1e-3), lr=0.05, momentum=0.9), steps=3)
        rep = sparsify.report(m)
        assert rep.totals["weight_sparsity"] > 0.1
        final = sparsify.finalize(m)
        assert all(type(mod) in (nn.Conv2d, nn.Linear) for mod in final.modules()
                   if isinstance(mod, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_single_threshold_is_one_element_and_old_scalar_checkpoints_load(granularity):
    """A single s is a (1,) tensor (FSDP2 refuses 0-d parameters); a checkpoint whose s is 0-d
    (saved before) loads into it with the same value."""
    m = make(granularity)
    sd = m.state_dict()
    keys = [k for k in sd if k.endswith(".s")]
    assert keys and all(sd[k].shape == (1,) for k in keys)
    old = {k: (v.reshape(()) - 1.0 if k in keys else v) for k, v in sd.items()}
    m2 = make(granularity)
    m2.load_state_dict(old)
    assert all(torch.equal(m2.state_dict()[k], sd[k] - 1.0) for k in keys)


def test_a_layer_pruned_whole_is_warned_once():
    """docs/methods/str.md promised a warning for a layer STR prunes whole; only the report's table
    said so. A head initialized small (torchvision's ViT head starts at zero) is under the
    threshold from the start and never trains: warned by sparsify() already, once."""
    import warnings

    import torch.nn.functional as F

    import sparsify
    from sparsify.core.keep import EmptyLayerWarning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    with torch.no_grad():
        net[3].weight.mul_(1e-3)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(net, "str", example_inputs=(x[:1],), s_init=-5.0)  # (said here already)
        opt = torch.optim.SGD(sparsify.param_groups(m, 5e-4), lr=0.05)
        for _ in range(4):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m)
    said = [str(w.message) for w in caught if issubclass(w.category, EmptyLayerWarning)]
    assert len(said) == 1 and "every weight of 3 " in said[0], said
    assert sparsify.report(m).totals["empty_layers"] == ["3"]
