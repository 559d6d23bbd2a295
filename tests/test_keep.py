"""The layer-collapse guard (``min_density``) of the global methods: docs/methods/st3.md,
"Layer collapse and min_density". The global count stays the official one; no layer empties."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsify
from sparsify.app.models import build_model
from sparsify.core.keep import EmptyLayerWarning, guarded_thresholds, min_kept
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import find_state
from sparsify.core.threshold import pruned_count, quantile
from sparsify.prepare.validate import RecipeError


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6), q=st.floats(0.0, 0.99),
       md=st.sampled_from([0.0, 0.01, 0.1, 0.3]), scales=st.lists(st.floats(0.01, 10), min_size=6, max_size=6),
       seed=st.integers(0, 1000))
def test_guard_meets_the_global_count_and_every_floor(sizes, q, md, scales, seed):
    g = torch.Generator().manual_seed(seed)
    values = [torch.rand(n, generator=g, dtype=torch.float64).float() * s for n, s in zip(sizes, scales)]
    if torch.cat(values).unique().numel() < sum(sizes):
        return  # ties: no threshold can prune an exact count
    taus, capped = guarded_thresholds(values, q, md)
    pruned = [int((v <= t).sum()) for v, t in zip(values, taus)]
    total = pruned_count(sum(sizes), q)
    assert sum(pruned) == total
    for v, p, k in zip(values, pruned, min_kept(sizes, md, total)):
        assert v.numel() - p >= k
    if not capped:  # the official global threshold, bit for bit
        assert all(bool(t == quantile(torch.cat(values), q)) for t in taus)


def test_guard_is_the_official_threshold_when_no_layer_reaches_its_floor():
    a, b = torch.rand(1000), torch.rand(500) + 0.1
    taus, capped = guarded_thresholds([a, b], 0.5, 0.05)
    assert capped == [] and taus[0] == taus[1] == quantile(torch.cat([a, b]), 0.5)


def lenet(recipe, **overrides):
    """LeNet-5 (8x8 inputs) with PyTorch's default init, under which the global 90% threshold
    lies above every weight of conv2 and fc2 (the built-in model uses LeCun init)."""
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=8)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    if recipe is None:
        return model
    return sparsify.sparsify(model, recipe, total_steps=4, begin=0, end=0, **overrides)


def kept(model) -> dict[str, int]:
    return {n: int(torch.count_nonzero(m.deployed_weight())) for n, m in model.named_modules()
            if isinstance(m, SparseWeightMixin)}


@pytest.mark.parametrize("recipe", ["st3", "st3-sigma", "gmp"])
def test_lenet5_at_init_keeps_every_layer_and_the_global_count(recipe):
    """Default init puts all of conv2 and fc2 below the global 90% threshold."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyLayerWarning)
        model = lenet(recipe)
        sparsify.step(model)
    counts = kept(model)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, SparseWeightMixin)}
    assert all(counts[n] >= 0.01 * sizes[n] for n in sizes), counts
    n = sum(sizes.values())
    assert n - sum(counts.values()) == pruned_count(n, 0.9)
    report = sparsify.report(model)
    (group,) = report.groups.values()
    held = {"st3": ["conv2", "fc2"], "gmp": ["conv2", "fc2"], "st3-sigma": ["conv1", "conv2", "fc3"]}[recipe]
    assert group["held_at_min_density"] == held
    assert f"held_at_min_density={held}" in str(report) and not report.totals["empty_layers"]


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_official_behaviour_empties_layers_and_warns_once_naming_them(recipe):
    with pytest.warns(EmptyLayerWarning, match="conv2") as record:
        model = lenet(recipe, min_density=0.0)  # at step 0 already: begin = end = 0
        sparsify.step(model)
        sparsify.step(model)
    assert len([w for w in record if issubclass(w.category, EmptyLayerWarning)]) == 1
    assert kept(model)["conv2"] == 0
    report = sparsify.report(model)
    assert report.totals["empty_layers"] == ["conv2", "fc2"]
    assert "100% sparse: conv2, fc2" in str(report)


@pytest.mark.parametrize("min_density", [0.0, 0.01])
def test_dual_prune_step_keeps_every_layer(min_density):
    model = sparsify.sparsify(lenet(None), "dual", total_steps=10, sparsity=0.9, min_density=min_density)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            sparsify.step(model)
    empty = [n for n, k in kept(model).items() if k == 0]
    warned = [str(w.message) for w in caught if issubclass(w.category, EmptyLayerWarning)]
    if min_density:
        assert not empty and not warned
    else:  # the unguarded global threshold: fc2 goes, and the warning says so
        assert "fc2" in empty and len(warned) == 1 and "fc2" in warned[0]


def test_mobilenet_v3_small_keeps_classifier_and_depthwise_convs():
    """examples/torchvision_finetune.py's default: mobilenet_v3_small + st3 (masks only, no run)."""
    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v3_small(weights=None, num_classes=2)
    model = sparsify.sparsify(base, "st3", total_steps=2, begin=0, end=0,
                              example_inputs=(torch.zeros(1, 3, 64, 64),))
    sparsify.step(model)
    counts = kept(model)
    mods = dict(model.named_modules())
    depthwise = [n for n in counts if getattr(mods[n], "groups", 1) > 1]
    assert depthwise and all(counts[n] > 0 for n in depthwise)
    assert counts["classifier.0"] > 0 and counts["classifier.3"] > 0
    assert find_state(model).groups  # the guard ran inside the one st3 group


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_lenet5_learns_on_digits_at_the_cli_defaults(recipe, tmp_path):
    """``sparsify train --model lenet5 --recipe st3|gmp --data digits --epochs 8``: far above chance
    (10%); dense reaches 94% in that run."""
    from sparsify.app.train import TrainConfig, train
    result = train(TrainConfig(model="lenet5", recipe=recipe, data="digits", epochs=8, threads=1,
                               out=str(tmp_path), progress=False), quiet=True)
    assert result["accuracy"] > 0.8, result["accuracy"]
    assert result["report"]["totals"]["empty_layers"] == []
    assert abs(result["report"]["totals"]["weight_sparsity"] - 0.9) < 0.002


@pytest.mark.parametrize("recipe", ["st3", "st3-sigma", "gmp"])
def test_floors_the_target_cannot_hold_are_refused(recipe):
    """min_density 0.5 at 90% sparsity gave every layer about 10% density, still listed as held at
    min_density: the floors shrank in silence. Refused now; the default still shrinks above 99%."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    with pytest.raises(RecipeError, match=r"min_density: must be at most 1 - sparsity = 0.1 .*got min_density=0.5"):
        sparsify.sparsify(net, recipe, sparsity=0.9, min_density=0.5, total_steps=10)
    sparsify.sparsify(net, recipe, sparsity=0.9, min_density=0.1, total_steps=10)
    sparsify.sparsify(net, recipe, sparsity=0.995, total_steps=10)  # the default 0.01: shrinks, as documented


def test_l1_prune_floors_are_checked_only_against_a_sparsity():
    bad = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                    "params": {"sparsity": 0.9, "min_density": 0.5, "end": 8}}]}
    with pytest.raises(RecipeError, match="min_density: must be at most 1 - sparsity"):
        sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), bad, total_steps=10)
    bad["rules"][0]["params"]["threshold"] = 0.01  # an absolute threshold: no count for floors to contradict
    sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), bad, total_steps=10)


def test_an_absolute_threshold_that_empties_layers_is_named_as_the_cause():
    """dual with threshold=0.5 pruned every layer and the warning blamed min_density."""
    recipe = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                                       "params": {"threshold": 0.5, "end": 2, "prune_at": 0.5}}]}
    m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), recipe, total_steps=4)
    with pytest.warns(EmptyLayerWarning, match="absolute threshold 0.5 is at or above every weight there.*lower the "
                                               "threshold"):
        for _ in range(3):
            sparsify.step(m)


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_a_layer_of_tied_magnitudes_is_not_emptied(recipe):
    """A zero-initialized head after one Adam step has every |w| equal (torchvision's ViT head,
    LoRA's lora_B): its own threshold at the floor fell on the tie, pruned all of it, and the
    EmptyLayerWarning blamed min_density. The tie is kept now (denser than the floor, not empty)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 10))
    with torch.no_grad():
        net[1].weight.copy_(1e-4 * torch.sign(torch.randn(10, 32)))  # 320 weights, one magnitude
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyLayerWarning)
        m = sparsify.sparsify(net, recipe, sparsity=0.9, total_steps=2, begin=0, end=0)
    kept = int(m[1].deployed_weight().count_nonzero())
    assert kept == 320, kept  # the tie kept whole; the global count falls on the other layer
    assert float(sparsify.report(m).totals["weight_sparsity"]) > 0.6
