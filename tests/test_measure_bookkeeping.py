"""The bookkeeping behind ``measure``'s and ``report``'s model-wide figures, counted by hand: layers
that cannot be counted, per-sample element counts, a tensor given twice to attention, the raw input
left out of activation sparsity, weight-weighted totals, and the attention projections in the
counts `sparsify train` reports."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.stats.runstats import activation_stats


class _Padded(nn.Linear):
    """A Linear that pads its input to its weight's width itself: the input measure sees cannot
    be related to the weight."""

    def forward(self, x):
        return F.linear(F.pad(x, (0, self.in_features - x.shape[-1])), self.weight, self.bias)


def test_uncounted_layers_count_as_dense_in_mult_macs():
    """Uncounted layers counted as 0 multiplies: measure said 88% fewer multiplies where only
    about 2% are removed (then a SAS model's layers, now counted on their slots)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), _Padded(64, 64), nn.ReLU(), nn.Linear(64, 10))
    r = sparsify.measure(net, [torch.randn(2, 6)])
    uncounted = [row for row in r.layers if row.mult_macs is None]
    counted = [row for row in r.layers if row.mult_macs is not None]
    assert uncounted and counted  # the padded layer's input is not related to its weight: not counted
    expected = sum(row.dense_macs for row in uncounted) + sum(row.mult_macs for row in counted)
    assert r.mult_macs == expected
    assert r.mult_macs <= r.dense_macs
    d = r.to_dict()
    assert d["mult_macs"] == expected
    assert d["mult_reduction"] == pytest.approx(1 - expected / r.dense_macs)
    # the uncounted layers alone are most of the dense multiplies: the reduction stays small
    assert r.mult_reduction < 1 - sum(row.dense_macs for row in uncounted) / r.dense_macs + 1e-9


def test_achieved_weights_total_weighs_layers_by_parameters():
    """A mean over layers: a 100x100 layer at ~92% and a 100x2 one at ~1% gave 0.46 model-wide,
    where 0.9 of the weights are zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 2))
    with torch.no_grad():
        net[1].weight.mul_(100)  # the small layer keeps (almost) all its weights
    m = sparsify.sparsify(net, "gmp", total_steps=20, example_inputs=torch.randn(1, 100))
    for _ in range(20):
        sparsify.step(m)
    rep = sparsify.report(m)
    weights = [mod.deployed_weight() for mod in m.modules() if hasattr(mod, "deployed_weight")]
    assert len(weights) == 2
    zeros = sum(int((w == 0).sum()) for w in weights)
    by_hand = zeros / sum(w.numel() for w in weights)
    t = rep.totals
    assert t["achieved"]["weights"] == pytest.approx(by_hand)
    assert t["achieved"]["weights"] == pytest.approx(t["weight_sparsity"])
    assert rep.to_dict()["totals"]["achieved"]["weights"] == pytest.approx(by_hand)
    per_layer = [row.achieved for row in rep.layers]
    assert abs(sum(per_layer) / len(per_layer) - by_hand) > 0.2  # the two means differ on this model


@pytest.mark.parametrize("batch", [1, 16])
def test_node_elements_are_per_sample(batch):
    """Elements multiplied by the batch size: a ReLU of 8 outputs measured on batches of 16 said 128
    elements per sample."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    m = sparsify.sparsify(net, "tl1", example_inputs=torch.randn(1, 4))
    r = sparsify.measure(m, [torch.randn(batch, 4), torch.randn(batch, 4)])
    assert r.samples == 2 * batch
    assert r.nodes
    assert [n.elements for n in r.nodes] == [8] * len(r.nodes)
    assert [n["elements"] for n in r.to_dict()["nodes"]] == [8] * len(r.nodes)


class _Attend(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 1)

    def forward(self, x, v):
        return self.mha(x, x, v)[0]  # one tensor as query and key, another as value


def test_query_given_as_key_counts_its_zeros_once():
    """Query and key one half-zero tensor, value dense: its zeros counted twice said the in-projection
    reads 1/3 zeros where the distinct inputs hold 1/4 (6 of 24)."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4)
    x[..., :2] = 0
    v = torch.randn(3, 1, 4)
    assert int((v == 0).sum()) == 0
    r = sparsify.measure(_Attend(), [(x, v)], input_fn=lambda b: b)
    rows = {row.name: row for row in r.layers}
    assert rows["mha.in_proj"].input_zero_fraction == pytest.approx(6 / 24)
    assert r.to_dict()["layers"][0]["input_zero_fraction"] == pytest.approx(0.25)


def test_activation_sparsity_leaves_out_the_raw_input():
    """Zeros of the data counted as activation sparsity: half-zero inputs raised the figure train /
    demo report above the ReLU's own zeros."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    x[:, :2] = 0  # half of the data is zeros
    s = activation_stats(net, [x])
    with torch.no_grad():
        h = net[1](net[0](x))
    by_hand = int((h == 0).sum()) / h.numel()  # the only activation: the second Linear's input
    assert s["activation_sparsity"] == pytest.approx(by_hand)
    assert s["layers"]["0"]["input_sparsity"] == pytest.approx(0.5)  # still reported per layer
    assert s["layers"]["2"]["input_sparsity"] == pytest.approx(by_hand)


def test_train_counts_take_in_the_attention_projections():
    """The effective MACs ``sparsify train`` reports count nn.MultiheadAttention's projections (read
    inside torch's attention function, never called as modules): on a sparse ViT, whose GELU and
    attention inputs hold no zeros, they equal the report's dense and non-zero-weight MACs."""
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3)
    m = sparsify.sparsify(vit, "gmp", begin=0, end=1, example_inputs=torch.zeros(1, 3, 16, 16))
    sparsify.step(m)
    totals = sparsify.report(m).to_dict()["totals"]
    s = activation_stats(m, [torch.randn(4, 3, 16, 16)])
    assert s["dense_macs"] == pytest.approx(totals["macs"])
    assert s["effective_macs"] == pytest.approx(totals["nonzero_macs"])
    assert s["effective_macs"] < 0.5 * s["dense_macs"]
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in s["layers"]
