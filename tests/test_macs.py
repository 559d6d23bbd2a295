"""MAC counting: the check values of docs/index.md (report), and agreement with torch.utils.flop_counter (FLOPs = 2·MACs)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsify
from sparsify.stats.macs import dense_macs
from sparsify.prepare.inputs import positions_per_sample


def flop_count(model, x) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name, macs", [("resnet18", 1_814_073_344), ("resnet50", 4_089_184_256)])
def test_dense_check_values_at_224(name, macs):
    model = getattr(torchvision.models, name)()
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # one forward for both counts
        assert dense_macs(model, (x,)) == macs
    assert counter.get_total_flops() == 2 * macs


@pytest.mark.parametrize("factory, shape", [
    (lambda: torchvision.models.mobilenet_v3_small(), (2, 3, 64, 64)),  # depthwise + SE 1x1 convs
    (lambda: nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(6 * 7, 5)), (3, 4, 16)),
    (lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)), (2, 5, 8)),  # tokens
])
def test_dense_macs_agree_with_flop_counter(factory, shape):
    model = factory()
    x = torch.randn(shape)
    assert 2 * dense_macs(model, (x,)) * shape[0] == flop_count(model, x)


def test_positions_per_sample():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 2))
    pos = positions_per_sample(model, (torch.zeros(4, 3, 10, 10),))
    assert pos == {"0": 25.0, "2": 1.0}
    assert model.training, "the model's mode is restored"


def test_report_and_plan_macs():
    x = torch.zeros(1, 3, 224, 224)
    model = torchvision.models.resnet18()
    plan = sparsify.plan(model, "st3", example_inputs=x, total_steps=10)
    assert sum(e.macs for e in plan.entries) == 1_814_073_344
    assert plan.shares() == {"param_share": 1.0, "mac_share": 1.0}
    m = sparsify.sparsify(model, "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x)
    rep = sparsify.report(m)
    assert rep.totals["macs"] == 1_814_073_344
    mods = dict(m.named_modules())
    factors = positions_per_sample(model, (x,))
    for row in rep.layers:
        w = mods[row.name].effective_weight()
        assert row.nonzero_macs == round(factors[row.name] * int(torch.count_nonzero(w)))
    assert rep.totals["nonzero_macs"] == sum(r.nonzero_macs for r in rep.layers)
    assert rep.totals["mac_reduction"] == pytest.approx(1 - rep.totals["nonzero_macs"] / rep.totals["macs"])


def test_report_counts_layers_left_dense():
    x = torch.zeros(1, 3, 224, 224)
    recipe = {"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3", "params": {"sparsity": 0.5}},
                                      {"match": {"name": "layer4.**"}, "method": None}]}
    m = sparsify.sparsify(torchvision.models.resnet18(), recipe, example_inputs=x)
    rep = sparsify.report(m)
    assert rep.totals["macs"] == 1_814_073_344  # dense layers (layer4, fc) still count
    assert all(not r.name.startswith("layer4") and r.name != "fc" for r in rep.layers)


def test_sparsify_counts_macs_with_the_forward_that_checks_the_inputs():
    """sparsify() runs the given example_inputs (to say at once when they do not fit, and to
    check its graph against the model: passes/reproduce.py); the report's MACs come from such a
    forward, so report() runs none of its own, and they match the dense count of the original
    model."""
    stems = []

    def count(module, args):  # real forwards of any copy of the stem (tracing passes proxies)
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and isinstance(args[0], torch.Tensor):
            stems.append(1)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.zeros(1, 3, 64, 64)
    expected = dense_macs(model, (x,))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        sparse = sparsify.sparsify(model, "st3", total_steps=100, example_inputs=x)
        ran = len(stems)
        report = sparsify.report(sparse)
    finally:
        handle.remove()
    assert ran >= 1 and len(stems) == ran
    assert report.totals["macs"] == expected


def test_attention_projections_left_dense_count_in_the_totals():
    """nn.MultiheadAttention reads its projections in F.multi_head_attention_forward, where no
    module hook sees them: totals, plan and dense_macs counted them only when a recipe rewrote
    them (a ViT's dense MACs were 180,544 under st3 and 139,584 under tl1). torch's own counter
    misses them too in eval (the fused fast path), so the expected count is the formula."""
    def vit():
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64, num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    tokens, dim = 5, 32  # 4 patches + the class token
    expected = (3 * 16 * 16 * dim * 4  # the patch conv: 4 output positions
                + 2 * tokens * (2 * dim * 64)  # the MLPs
                + 2 * tokens * (3 * dim * dim + dim * dim)  # the attention projections
                + dim * 10)  # the head reads the class token
    assert dense_macs(vit(), (x,)) == expected
    excluded = {"version": 1, "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "st3"},
                                        {"match": {"name": "**.self_attention.**"}, "method": None}]}
    for recipe in ("st3", "tl1", excluded):
        m = sparsify.sparsify(vit(), recipe, total_steps=10, example_inputs=x)
        assert sparsify.report(m).totals["macs"] == expected, recipe
    plan = sparsify.plan(vit(), "tl1", total_steps=10, example_inputs=x)
    assert all(e.macs for e in plan.entries if e.params), [(e.name, e.macs) for e in plan.entries]


def test_layers_multiplied_inside_a_dense_leaf_count_in_plan_and_report():
    """Swin's attention passes ``qkv.weight`` / ``proj.weight`` to a function; with the attention
    left dense its module is not traced into, no module call reaches those layers, and plan and
    report counted 344,384 of the 475,456 MACs the model computes."""
    def swin():
        torch.manual_seed(0)
        return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                                  window_size=[4, 4], num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    recipe = {"version": 1, "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "st3"},
                                      {"match": {"name": "**.attn.**"}, "method": None}]}
    expected = dense_macs(swin(), (x,))
    plan = sparsify.plan(swin(), recipe, total_steps=10, example_inputs=x)
    assert all(e.macs for e in plan.entries if e.params), [(e.name, e.macs) for e in plan.entries]
    assert sum(e.macs for e in plan.entries if e.params) == expected
    m = sparsify.sparsify(swin(), recipe, total_steps=10, example_inputs=x)
    assert sparsify.report(m).totals["macs"] == expected


class _ImageList(nn.Module):
    """A detector's call: a list of (C, H, W) images, one per sample."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, images):
        return self.fc(self.conv(torch.stack(images)).mean((2, 3)))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_list_of_images_counts_one_sample_per_image(n):
    images = [torch.randn(3, 10, 10) for _ in range(n)]
    m = sparsify.sparsify(_ImageList(), "gmp", total_steps=4, example_inputs=(images,))
    rows = {r.name: r for r in sparsify.report(m).layers}
    assert rows["conv"].macs == 8 * 8 * 4 * 3 * 9 and rows["fc"].macs == 8  # per image, whatever n
    measured = sparsify.measure(m, [(images,), (images,)], input_fn=lambda b: b)
    assert measured.samples == 2 * n


def test_a_dense_layer_with_zeros_counts_them_in_the_non_zero_weight_macs():
    """A layer no method rewrote but whose weight has zeros (pruned with torch.nn.utils.prune before
    sparsify) counted as fully dense in the non-zero-weight MACs: the report said 206,629 of 231,264
    where the layer computes with half its weights zero."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    prune.l1_unstructured(net[2], "weight", amount=0.5)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning):  # the pruned layer stays dense, said
        m = sparsify.sparsify(net, "gmp", total_steps=4, example_inputs=x)
    t = sparsify.report(m).totals
    positions = 4 * 4  # conv 2's output positions per sample
    zeros = int((net[2].weight == 0).sum())
    assert zeros == 288
    rows = {r.name: r for r in sparsify.report(m).layers}
    assert "2" not in rows  # left dense
    sparse_nz = sum(r.nonzero_macs for r in rows.values())
    assert t["nonzero_macs"] == sparse_nz + positions * (net[2].weight.numel() - zeros)
    assert t["macs"] - t["nonzero_macs"] >= positions * zeros


class _DictBatch(nn.Module):
    """A forward taking one dict: two inputs of one batch (256 MACs per sample)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, batch):
        return self.fc(torch.relu(self.a(batch["x"])) + torch.relu(self.b(batch["y"])))


class _PairBatch(_DictBatch):
    """The same on one (x, y) tuple."""

    def forward(self, pair):
        x, y = pair
        return self.fc(torch.relu(self.a(x)) + torch.relu(self.b(y)))


@pytest.mark.parametrize("factory, batch", [
    (_DictBatch, {"x": torch.randn(3, 8), "y": torch.randn(3, 4)}),
    (_PairBatch, (torch.randn(6, 8), torch.randn(6, 4))),
])
def test_a_dict_or_tuple_argument_counts_its_tensors_rows_as_samples(factory, batch):
    per_sample = 8 * 16 + 4 * 16 + 16 * 4
    m = sparsify.sparsify(factory(), "gmp", total_steps=10, example_inputs=(batch,))
    assert sparsify.report(m).totals["macs"] == per_sample  # the batch of 3 read as 1 sample said 768
    measured = sparsify.measure(m, [(batch,)], input_fn=lambda b: b)
    rows = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    assert measured.samples == rows and measured.dense_macs == per_sample
