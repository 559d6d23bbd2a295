"""ConvTranspose1d/2d/3d under every weight method: a U-Net-like decoder (an up-sampling called
with ``output_size``, a skip connection) and tiny generators train 3 steps, reach their
sparsity, report, finalize to plain ConvTranspose layers with equal outputs and reload."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.conv1d import torch_layout
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import find_state
from sparsify.methods.nm import nm_compliant, nm_mask
from sparsify.methods.st3 import st3_effective_weight, st3_scale
from sparsify.stats.measure import measure

WEIGHT_RECIPES = ["st3", "st3-sigma", "gmp", "str", "str-global", "nm-2-4", "dual"]
CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class TinyUNet(nn.Module):
    """Two strided convs down, two transposed convs up (the first called with ``output_size``,
    the way odd-sized U-Nets call it), a skip connection, a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.down1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        d1 = F.relu(self.down1(x))
        d2 = F.relu(self.down2(d1))
        u1 = F.relu(self.up1(d2, output_size=d1.shape[-2:]))
        return self.head(F.relu(self.up2(torch.cat([u1, d1], 1))))


def generator(dim: int) -> nn.Module:
    """A DCGAN-like generator in ``dim`` spatial dimensions (latent (N, 8, 1, ...) -> map)."""
    ct = CONVT[dim - 1]
    return nn.Sequential(ct(8, 16, 3), nn.ReLU(), ct(16, 8, 4, stride=2, padding=1, output_padding=1, dilation=1),
                         nn.ReLU(), ct(8, 4, 3, stride=2, padding=1, bias=False), nn.Tanh())


def _inputs(kind: str):
    if kind == "unet":
        return TinyUNet(), (torch.randn(2, 3, 15, 15),)  # odd size: output_size matters
    dim = int(kind[-2])
    return generator(dim), (torch.randn(2, 8, *([1] * dim)),)


def _train(m, x, steps=3):
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = m(*x).square().mean() + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# dual's weight stage runs in the first half of its schedule: prune at step 1 of 3
OVERRIDES = {"dual": {}, "str": {"s_init": -4.0}, "str-global": {"s_init": -4.0}}


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
@pytest.mark.parametrize("kind", ["unet", "gen1d", "gen2d", "gen3d"])
def test_every_weight_recipe_rewrites_conv_transpose(kind, recipe):
    torch.manual_seed(0)
    dense, x = _inputs(kind)
    expected_dense = dense(*x)
    m = _quiet(sparsify.sparsify, dense, recipe, example_inputs=x, total_steps=3, **OVERRIDES.get(recipe, {}))
    plan = find_state(m).plan
    convt = [n for n, mod in dense.named_modules() if isinstance(mod, CONVT)]
    rewritten = {e.name for e in plan.rewritten}
    # nm leaves a layer dense only when its input channels are not a multiple of 4
    assert set(convt) <= rewritten, [e for e in plan.entries if e.name in convt]
    for n in convt:
        assert isinstance(m.get_submodule(n), SparseWeightMixin) and isinstance(m.get_submodule(n), CONVT)
    assert not any("ConvTranspose" in e.kind and e.method is None for e in plan.entries)
    assert torch.equal(dense(*x), expected_dense)  # the caller's model is untouched
    _train(m, x)
    rep = sparsify.report(m)
    rows = {r.name: r for r in rep.layers}
    assert all(rows[n].macs and rows[n].params == dense.get_submodule(n).weight.numel() for n in convt)
    if recipe.startswith("st3") or recipe == "gmp":
        # one global threshold at the end of the ramp: the rule's layers together reach 90%
        assert rep.totals["weight_sparsity"] == pytest.approx(0.9, abs=0.01)
    elif recipe == "nm-2-4":
        assert rep.groups["rule0_nm"]["nm_compliant"] is True
        assert all(rows[n].weight_sparsity == 0.5 for n in convt)
    elif recipe == "dual":
        assert rep.totals["weight_sparsity"] > 0.3
    else:  # STR: thresholds are live, trainable parameters of every ConvTranspose
        assert all(m.get_submodule(n).threshold_param().requires_grad for n in convt)
    m.eval()
    sparse_out = m(*x)
    final = sparsify.finalize(m)  # checks the outputs itself
    for n in convt:
        assert type(final.get_submodule(n)) is type(dense.get_submodule(n))
        assert torch.equal(final.get_submodule(n).weight, m.get_submodule(n).deployed_weight())
    torch.testing.assert_close(final(*x), sparse_out, rtol=1e-5, atol=1e-6)
    # state_dict round trip into a fresh sparsify of the same (re-seeded) model
    torch.manual_seed(0)
    fresh_dense, _ = _inputs(kind)
    fresh = _quiet(sparsify.sparsify, fresh_dense, recipe, example_inputs=x, total_steps=3,
                   **OVERRIDES.get(recipe, {}))
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(*x), sparse_out, rtol=0, atol=0)


def test_st3_scale_runs_along_the_output_channels():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.ConvTranspose2d(6, 10, 3))
    m = sparsify.sparsify(dense, "st3", example_inputs=torch.randn(1, 6, 4, 4), total_steps=3, begin=0, end=0)
    layer = m.get_submodule("0")
    assert layer.scale.shape == (10,)
    w = torch_layout(layer, layer.weight.detach())  # (out, in, k, k)
    mask = torch_layout(layer, layer.mask)
    tau = float(layer.tau)
    assert tau > 0
    c = st3_scale(w, mask)
    torch.testing.assert_close(layer.scale, c)
    expected = torch_layout(layer, st3_effective_weight(w, tau, mask, c))
    torch.testing.assert_close(layer.effective_weight().detach(), expected)


def test_nm_groups_run_along_the_input_channels_after_updates():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, stride=2))
    x = (torch.randn(2, 8, 5, 5),)
    m = sparsify.sparsify(dense, "nm-2-4", example_inputs=x, total_steps=6)
    _train(m, x, steps=4)  # later updates write only the flags that changed
    layer = m.get_submodule("0")
    expected = nm_mask(torch_layout(layer, layer.weight.detach()), 2, 4)
    assert torch.equal(torch_layout(layer, layer.mask), expected)
    assert nm_compliant(torch_layout(layer, layer.deployed_weight()), 2, 4)


def test_grouped_conv_transpose_plan_and_macs():
    """Per-output-channel methods leave a grouped ConvTranspose dense with the reason; unstructured
    ones rewrite it. MACs: every input position meets every weight element."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2))
    x = (torch.randn(1, 4, 5, 5),)
    st3 = sparsify.plan(dense, "st3", example_inputs=x)
    entry = next(e for e in st3.entries if e.name == "0")
    assert entry.method is None and "groups=2" in entry.reason and "per output channel" in entry.reason
    assert entry.macs == 25 * dense[0].weight.numel()
    gmp = sparsify.plan(dense, "gmp", example_inputs=x)
    assert {e.name for e in gmp.rewritten} == {"0", "2"}
    assert next(e for e in gmp.entries if e.name == "2").macs == 11 * 11 * dense[2].weight.numel()
    for recipe in ("str", "dual"):
        assert "0" in {e.name for e in sparsify.plan(dense, recipe, example_inputs=x).rewritten}
    m = sparsify.sparsify(dense, "gmp", example_inputs=x, total_steps=3)
    _train(m, x)
    sparsify.finalize(m)


def test_measure_counts_conv_transpose_multiplies():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.6] = 0
    x = torch.randn(2, 3, 4, 4)
    x[x < 0.2] = 0
    got = measure(nn.Sequential(layer), [x], input_fn=lambda b: (b,)).layers[0]
    # brute force: input element (n, i, p) times every non-zero of W[i]
    nnz_per_in = (layer.weight != 0).reshape(3, -1).sum(1)
    mult = int(sum(int((x[:, i] != 0).sum()) * int(nnz_per_in[i]) for i in range(3)))
    assert got.mult_macs == mult // 2 and got.dense_macs == 16 * layer.weight.numel()


def test_sas_leaves_conv_transpose_dense_with_a_reason():
    data = {"version": 1, "name": "s", "rules": [{"match": {"type": "ConvTranspose2d"}, "method": "sas"}]}
    plan = _quiet(sparsify.plan, TinyUNet(), data, example_inputs=torch.randn(1, 3, 15, 15))
    reasons = {e.name: e.reason for e in plan.entries}
    assert "sas applies to Conv1d, Conv2d, Conv3d, Linear only" in reasons["up1"]


def test_output_size_only_for_transposed_layers():
    m = sparsify.sparsify(nn.Sequential(nn.Conv2d(2, 2, 1)), "gmp", example_inputs=torch.randn(1, 2, 3, 3),
                          total_steps=2)
    with pytest.raises(TypeError, match="takes no output_size"):
        m.get_submodule("0")(torch.randn(1, 2, 3, 3), [3, 3])


def test_activation_stats_count_conv_transpose_inputs():
    from sparsify.stats.runstats import activation_stats
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.ReLU(), nn.ConvTranspose2d(6, 2, 2))
    x = torch.randn(3, 4, 5, 5)
    s = activation_stats(net, [x])
    first, second = s["layers"]["0"], s["layers"]["2"]
    assert first["dense_macs"] == 25 * net[0].weight.numel() == first["effective_macs"]  # no zero input
    assert second["dense_macs"] == 11 * 11 * net[2].weight.numel()
    assert 0.3 < second["input_sparsity"] < 0.7 and second["effective_macs"] < second["dense_macs"]
