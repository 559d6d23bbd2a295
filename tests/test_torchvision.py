"""Real torchvision models (weights=None): sparsify -> 3 optimizer steps -> report -> finalize."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops import StochasticDepth

import sparsify
from sparsify.methods import SparseWeightMixin
from sparsify.core.threshold import pruned_count

WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def small_vit():
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 64),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 64),
    "vit_small_config": (small_vit, 32),
}


def final_weight(final, name):
    """The deployed weight of layer ``name``: a module's ``weight``, or a packed parameter such as
    ``nn.MultiheadAttention.in_proj_weight`` (``...in_proj`` in the sparse model)."""
    mods = dict(final.named_modules())
    if name in mods:
        return mods[name].weight
    return final.get_parameter(name + "_weight")


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseWeightMixin)}


@pytest.mark.parametrize("name", list(MODELS))
def test_sparsify_train_report_finalize(name):
    factory, size = MODELS[name]
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, size, size)
    # 3 steps: begin 0.05*3 -> 0, end 0.5*3 -> 2, fix 0.9*3 -> 3: ramp, hold, then the fix
    m = sparsify.sparsify(model, "st3", total_steps=3, example_inputs=x, copy=True)  # the caller's stays as is
    layers = sparse_layers(m)
    assert layers, "nothing was rewritten"
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01, momentum=0.9)
    for i in range(3):
        loss = F.cross_entropy(m(torch.randn(2, 3, size, size)), torch.tensor([i, i + 1])) + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        assert all(lay.weight.grad is not None for lay in layers.values())
        opt.step()
        assert sparsify.step(m) == i + 1
    assert all(bool(lay.fixed) for lay in layers.values())

    rep = sparsify.report(m)
    assert rep.step == 3 and {r.name for r in rep.layers} == set(layers)
    n = sum(r.params for r in rep.layers)
    zeros = n - sum(r.nonzero_params for r in rep.layers)
    assert zeros >= pruned_count(n, 0.9)
    assert rep.totals["weight_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert rep.totals["macs"] > rep.totals["nonzero_macs"] > 0
    assert rep.to_dict()["layers"][0]["name"] in str(rep)

    final = sparsify.finalize(m)
    assert not sparse_layers(final)
    assert not any("sparsify" in type(mod).__module__ for mod in final.modules())
    n_weight = sum(isinstance(mod, WEIGHT_TYPES) for mod in model.modules())
    assert sum(isinstance(mod, WEIGHT_TYPES) for mod in final.modules()) == n_weight
    x2 = torch.randn(2, 3, size, size)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(final(x2), m(x2), rtol=1e-4, atol=1e-4)
    for r in rep.layers:
        assert int(torch.count_nonzero(final_weight(final, r.name))) == r.nonzero_params
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"training the copy changed the caller's model at {k}"


def test_convnext_stochastic_depth_stays_live():
    model = torchvision.models.convnext_tiny(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    m = sparsify.sparsify(model, "st3", sparsity=0.0, total_steps=10, example_inputs=x)
    # the blocks holding stochastic depth are traced (their Linear layers are rewritten), but the
    # StochasticDepth modules themselves stay leaves, so their `self.training` check stays live
    graphs = [g for g in m.modules() if isinstance(g, fx.GraphModule)]
    sd_nodes = [n for g in graphs for n in g.graph.nodes
                if n.op == "call_module" and isinstance(g.get_submodule(n.target), StochasticDepth)]
    assert len(sd_nodes) == sum(isinstance(mod, StochasticDepth) for mod in model.modules()) > 0
    assert not any(n.op == "call_function" and "stochastic_depth" in str(n.target)
                   for g in graphs for n in g.graph.nodes)

    model.eval()
    m.eval()
    with torch.no_grad():
        y1, y2, ref = m(x), m(x), model(x)
    assert torch.equal(y1, y2), "eval must be deterministic"
    assert torch.equal(y1, ref), "at sparsity 0 the eval output is the original model's"

    model.train()
    m.train()
    with torch.no_grad():
        torch.manual_seed(3)
        t1 = m(x)
        t2 = m(x)
        torch.manual_seed(3)
        ref_t = model(x)
    assert not torch.equal(t1, t2), "train mode must drop paths at random"
    assert torch.equal(t1, ref_t), "and exactly as the original model does under the same seed"


def _mha_projection_names(model):
    return [(name, f"{name}.in_proj", f"{name}.out_proj") for name, mod in model.named_modules()
            if isinstance(mod, nn.MultiheadAttention)]


def _mentioned(plan, name):
    return [e for e in plan.entries if e.name == name or e.name.startswith(name + "_") or e.name == name + "_weight"]


def test_vit_plan_reports_attention_weights():
    vit = small_vit()
    x = torch.randn(1, 3, 32, 32)
    plan = sparsify.plan(vit, "st3", example_inputs=x)
    projections = _mha_projection_names(vit)
    assert len(projections) == 2
    for _, in_proj, out_proj in projections:
        for proj in (in_proj, out_proj):
            entries = _mentioned(plan, proj)
            assert entries, f"plan says nothing about {proj}"
            assert all(e.method is not None or e.reason for e in entries), "dense entries say why"
    d = plan.to_dict()
    assert {e["name"] for e in d["entries"]} >= {"conv_proj", "heads.head"}
    assert "MACs" in str(plan)


def test_real_vit_b_16_plan_covers_every_weight():
    """Plan only (no training): all 12 attention blocks of the real vit_b_16 are accounted for."""
    vit = torchvision.models.vit_b_16()
    plan = sparsify.plan(vit, "st3", example_inputs=torch.randn(1, 3, 224, 224))
    projections = _mha_projection_names(vit)
    assert len(projections) == 12
    for _, in_proj, out_proj in projections:
        for proj in (in_proj, out_proj):
            assert _mentioned(plan, proj), f"plan says nothing about {proj}"
    names = {e.name for e in plan.entries}
    plain = [n for n, mod in vit.named_modules() if isinstance(mod, WEIGHT_TYPES) and ".self_attention." not in n]
    assert set(plain) <= names
    assert plan.shares()["param_share"] > 0.5
