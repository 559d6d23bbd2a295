"""Every weight method on real torchvision models: rewrite, train a step, report, finalize."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin

RECIPES = {"st3": dict(begin=0, end=1, fix=None), "str": dict(s_init=-4.0), "str-global": dict(s_init=-4.0),
           "gmp": dict(begin=0, end=1), "nm-2-4": dict(begin=0, fix=None)}


def small_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def narrow_convnext_tiny():
    """convnext_tiny's layout (depths 3-3-9-3, 7x7 depthwise, LayerNorm, stochastic depth) at 1/6
    of its width: the same graph, 40x fewer weights, so the test stays fast."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    widths, depths = (16, 32, 64, 128), (3, 3, 9, 3)
    setting = [CNBlockConfig(w, widths[i + 1] if i + 1 < 4 else None, d) for i, (w, d) in enumerate(zip(widths, depths))]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=10)


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "convnext_tiny_layout": narrow_convnext_tiny,
    "vit": small_vit,
}


def weight_layers(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_weight_method_on(model_name, recipe):
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 2])
    dense = MODELS[model_name]()
    m = sparsify.sparsify(dense, recipe, example_inputs=x, total_steps=4, **RECIPES[recipe])
    plan = sparsify.core.state.find_state(m).plan
    # every Conv/Linear is accounted for: rewritten, or dense with a reason
    listed = {e.name: e for e in plan.entries}
    for name in weight_layers(dense):
        e = listed.get(name)
        if e is None:  # a hidden weight handled under another name (MultiheadAttention's in_proj)
            assert any(k.startswith(name) for k in listed), name
            continue
        assert e.method is not None or e.reason, name
    assert len(plan.rewritten) >= 0.5 * len(weight_layers(dense))
    # one step with BatchNorm statistics frozen: running stats from 2 images at 1x1 resolution
    # would make the eval-mode finalize check meaningless for any model, sparse or not
    m.eval()
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sparsify.step(m)
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    rep = sparsify.report(m)
    assert rep.totals["weight_sparsity"] > 0.01, rep.totals
    if recipe == "nm-2-4":
        assert rep.groups["rule0_nm"]["nm_compliant"] is True
    final = sparsify.finalize(m, x)  # checks outputs against the sparse model
    assert not any(isinstance(mod, SparseWeightMixin) for mod in final.modules())


def test_depthwise_and_stem_under_nm_are_reported_dense():
    p = sparsify.plan(torchvision.models.mobilenet_v3_small(num_classes=10), "nm-2-4",
                      example_inputs=torch.randn(1, 3, 32, 32))
    reasons = {e.name: e.reason for e in p.dense}
    assert "input channels" in reasons["features.0.0"]  # RGB stem: 3 inputs
    assert "input channels" in reasons["features.1.block.0.0"]  # depthwise: 1 input per group
    assert len(p.rewritten) > 20


def test_vit_attention_weights_are_rewritten_or_reported():
    m = sparsify.sparsify(small_vit(), "gmp", begin=0, end=0, example_inputs=torch.randn(1, 3, 32, 32))
    plan = sparsify.core.state.find_state(m).plan
    attn = [e for e in plan.entries if "self_attention" in e.name]
    assert attn
    for e in attn:
        assert e.method is not None or "MultiheadAttention" in e.reason or e.reason, e
