"""sparsify.measure: zero fractions of regularized / masked nodes and multiplicative MACs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.stats.macs import dense_macs
from sparsify.stats.layer_counts import _layer_counts


def brute_force_mult(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """Σ over samples, output positions, output channels and taps of 1[w ≠ 0]·1[x ≠ 0]."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    g = conv.groups
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    k = conv.kernel_size[0] * conv.kernel_size[1]
    total = 0
    for gi in range(g):
        xs = (cols[:, gi * cin_g * k:(gi + 1) * cin_g * k] != 0).double()  # (N, cin_g*k, L)
        ws = (conv.weight[gi * cout_g:(gi + 1) * cout_g].reshape(cout_g, -1) != 0).double()
        total += int(torch.einsum("ok,nkl->", ws, xs))
    return total


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (4, 1, 2, 2), (1, 2, 1, 1)])
def test_conv_multiplicative_macs_equal_brute_force(groups, stride, padding, dilation):
    conv = nn.Conv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.5] = 0
    x = torch.relu(torch.randn(3, 4, 9, 9))  # about half the inputs are zero
    y = conv(x)
    dense, mult, zeros, n = _layer_counts(conv, x, y, None)
    assert mult == brute_force_mult(conv, x)
    assert dense == y.shape[-1] * y.shape[-2] * conv.weight.numel() * 3
    assert zeros == int((x == 0).sum()) and n == x.numel()


def test_linear_multiplicative_macs_and_output_position_masks():
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight[:, :2] = 0
    x = torch.tensor([[1.0, 1.0, 0.0, 2.0, 0.0, 3.0]])
    _, mult, _, _ = _layer_counts(lin, x, lin(x), None)
    assert mult == 5 * 2  # only inputs 3 and 5 meet non-zero weights
    conv = nn.Conv2d(2, 3, 1, bias=False)
    x = torch.ones(1, 2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    _, mult, _, _ = _layer_counts(conv, x, conv(x), mask)
    assert mult == 2 * 3 * 1  # one kept output position


def test_resnet18_tl1_nodes_zero_fractions_and_dense_macs():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    m = sparsify.sparsify(net, "tl1", example_inputs=x)
    relu_outs = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: relu_outs.append(o.clone()))
             for mod in net.modules() if isinstance(mod, nn.ReLU)]
    net.eval()(x)
    for h in hooks:
        h.remove()
    r = sparsify.measure(m, [(x, torch.zeros(2)), (x, torch.zeros(2))])  # (inputs, targets) batches
    assert r.samples == 4 and len(r.nodes) == 17
    zeros = sum(int((o == 0).sum()) for o in relu_outs)
    elements = sum(o.numel() for o in relu_outs)
    assert r.zero_fraction == pytest.approx(zeros / elements)
    assert sorted(n.zero_fraction for n in r.nodes) == pytest.approx(
        sorted(float((o == 0).float().mean()) for o in relu_outs))
    assert r.dense_macs == dense_macs(net, (x[:1],))
    # the stem sees the (dense) image; every later conv reads a relu output, about half zeros
    stem = next(layer for layer in r.layers if layer.name == "conv1")
    assert stem.mult_macs == stem.dense_macs - _padding_products(net.conv1, x[:1])
    assert 0.2 < r.mult_reduction < 0.8
    assert "multiplicative" in str(r) and r.to_dict()["mult_macs"] == r.mult_macs


def _padding_products(conv, x):
    """Products that read a zero-padding position (dense MACs count them, multiplicative not)."""
    taps_inside = F.conv2d(torch.ones_like(x), torch.ones(1, *conv.weight.shape[1:]), stride=conv.stride,
                           padding=conv.padding)  # per output position: taps that read the image
    all_taps = conv.weight[0].numel() * taps_inside.numel()
    return int(round(float(all_taps - taps_inside.sum()))) * conv.out_channels


def test_semi_structured_masks_reduce_counted_macs_by_the_dropped_positions():
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    m = sparsify.sparsify(net, "semi-structured", example_inputs=x, begin=0, end=0, sparsity=0.3)
    r = sparsify.measure(m, [x])
    assert {n.kind for n in r.nodes} == {"mask"} and len(r.nodes) == 17
    for n in r.nodes:
        assert n.zero_fraction >= 0.25  # at least the dropped positions (round(0.3·H·W)) are zero
    base = sparsify.measure(net, [x])
    assert r.mult_macs < base.mult_macs and r.dense_macs == base.dense_macs


def test_bad_batches_say_what_to_do():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="keys x name no parameter of Sequential.forward.*input_fn"):
        sparsify.measure(net, [{"x": torch.zeros(1, 2)}])
    r = sparsify.measure(net, [{"x": torch.zeros(3, 2)}], input_fn=lambda b: (b["x"],))
    assert r.samples == 3 and r.mult_macs == 0 and r.dense_macs == 4


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = torch.relu(x)  # zeros in the attention's input
        return self.mha(x, x, x, need_weights=False)[0]


def test_attention_projections_are_measured_with_their_input_zeros():
    """nn.MultiheadAttention multiplies its projections inside F.multi_head_attention_forward,
    where no module hook sees them: measure left them out (a ViT measured 164,480 fewer dense
    MACs than it computes). The input projection's multiplies drop with the query/key/value
    zeros; the output projection's input is not visible, so only its weight zeros count."""
    torch.manual_seed(0)
    net = _SelfAttention()
    with torch.no_grad():
        net.mha.in_proj_weight[torch.rand_like(net.mha.in_proj_weight) < 0.5] = 0
        net.mha.out_proj.weight[:3] = 0
    x = torch.randn(2, 5, 8)
    r = sparsify.measure(net, [x, x])  # two batches: the same per-sample counts
    rows = {row.name: row for row in r.layers}
    nonzero = (torch.relu(x) != 0).double()
    expected_in = int(torch.einsum("ntk,ok->", nonzero, (net.mha.in_proj_weight != 0).double())) // 2
    assert rows["mha.in_proj"].dense_macs == 5 * 3 * 8 * 8
    assert rows["mha.in_proj"].mult_macs == expected_in
    assert rows["mha.in_proj"].input_zero_fraction == pytest.approx(float((torch.relu(x) == 0).double().mean()))
    assert rows["mha.out_proj"].dense_macs == 5 * 8 * 8
    assert rows["mha.out_proj"].mult_macs == 5 * 5 * 8 and rows["mha.out_proj"].input_zero_fraction is None
    assert r.dense_macs == dense_macs(net, (x[:1],))


def test_weight_sparse_transformers_measure_what_the_report_counts():
    """A weight-sparse ViT (MultiheadAttention) and a Swin (``F.linear(x, qkv.weight)`` in its
    attention function): measure's dense MACs are dense_macs' and the report's, and its
    multiplies are the report's non-zero MACs (none of these layers' inputs has zeros)."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                              hidden_dim=32, mlp_dim=64, num_classes=10)
    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[4, 4], num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    for net in (vit, swin):
        dense = dense_macs(net, (x[:1],))
        assert sparsify.measure(net, [x]).dense_macs == dense
        m = sparsify.sparsify(net, "st3", total_steps=4, example_inputs=x[:1], begin=0, end=2)
        opt = torch.optim.SGD(sparsify.param_groups(m), lr=0.01)
        for _ in range(3):
            loss = m(x).square().mean()
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m)
        r, totals = sparsify.measure(m, [x]), sparsify.report(m).totals
        assert r.dense_macs == dense == totals["macs"], type(net).__name__
        assert r.mult_macs == totals["nonzero_macs"] < dense / 5, type(net).__name__
