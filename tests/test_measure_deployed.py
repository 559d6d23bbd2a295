"""sparsify.measure on deployed models: a finalized SAS model (GraphModules multiplying the wide
weight with torch.conv2d / F.linear) and accelerated layers (their own kernels) count as the
model they were made from; a module kind measure cannot count is named, not dropped."""
from __future__ import annotations

import torch
from torch import nn

import sparsify
from sparsify.deploy.accelerate import accelerate
from sparsify.deploy.accelerate.direct_conv import DirectSparseConv2d
from sparsify.deploy.accelerate.patch_conv import PatchSkipConv2d
from sparsify.deploy.accelerate.sparse_linear import SparseConv1x1, SparseLinear
from sparsify.stats.layer_counts import _layer_counts


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def _rows(r) -> dict:
    return {row.name: (row.dense_macs, row.mult_macs) for row in r.layers}


def test_finalized_sas_model_measures_as_the_training_model():
    """Only the first conv (not SAS) was counted on the finalized model: the SAS layers vanished."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(_net(), "sas", total_steps=4, example_inputs=x)
    with torch.no_grad():  # the second slot's weights, zero at the start, as training makes them
        for mod in m.modules():
            if hasattr(mod, "sas_m"):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
    batches = [torch.randn(2, 3, 8, 8)]
    trained, final = sparsify.measure(m, batches), sparsify.measure(sparsify.finalize(m), batches)
    assert _rows(final) == _rows(trained)
    assert len(trained.layers) == 4 and not trained.uncounted and not final.uncounted
    assert final.dense_macs == trained.dense_macs and final.mult_macs == trained.mult_macs
    sas = [row for row in trained.layers if row.name != "0"]
    # the wide weight meets the slots: at most one of the two per input element is non-zero
    assert all(row.mult_macs <= row.dense_macs // 2 + 1 and row.input_zero_fraction >= 0.5 for row in sas)


def test_accelerated_layers_measure_as_the_plain_layers_they_compute():
    """Direct sparse convs, CSR 1x1 convs and Linears ran uncounted: gmp's accelerated ResNet-18
    kept 4 of its 21 layers."""
    torch.manual_seed(0)
    plain = _net().eval()
    with torch.no_grad():
        for p in plain.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand_like(p) > 0.7)
    fast = nn.Sequential(DirectSparseConv2d.from_conv(plain[0]), nn.ReLU(), DirectSparseConv2d.from_conv(plain[2]),
                         nn.ReLU(), SparseConv1x1.from_conv(plain[4]), nn.ReLU(), nn.Flatten(),
                         SparseLinear.from_linear(plain[7]))
    batches = [torch.randn(3, 3, 8, 8)]
    want, got = sparsify.measure(plain, batches), sparsify.measure(fast, batches)
    assert _rows(got) == _rows(want) and len(want.layers) == 4
    assert got.mult_macs < got.dense_macs and not got.uncounted


def test_patch_skipping_conv_counts_the_kept_positions_only():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    keep = torch.rand(6, 6) > 0.4
    x = torch.relu(torch.randn(2, 3, 6, 6))
    r = sparsify.measure(nn.Sequential(PatchSkipConv2d.from_conv(conv, keep)), [x])
    dense, mult, _, _ = _layer_counts(conv, x, conv(x), keep)
    assert [(row.name, row.dense_macs, row.mult_macs) for row in r.layers] == [("0", dense // 2, mult // 2)]


def test_a_masked_conv_accelerate_kept_dense_counts_the_kept_positions_only():
    """A semi-structured conv that accelerate kept dense (BN folded, the mask turned into a fill of
    BN(0) at the skipped positions) was counted at every output position: twice the finalized
    model's count at sparsity 0.5, for the same function with the same zeros."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 16, 16)
    m = sparsify.sparsify(net, "semi-structured", example_inputs=x, begin=0, end=0, sparsity=0.5).eval()
    final = sparsify.finalize(m, example_inputs=x)
    batches = [torch.randn(2, 3, 16, 16)]
    want = sparsify.measure(final, batches)
    for decide in ("never", "always"):  # kept dense, patch-skipping
        fast = accelerate(final, x, decide=decide)
        assert {row.path for row in fast.acceleration.layers} == {"dense" if decide == "never" else "patch-skip"}
        got = sparsify.measure(fast, batches)
        assert _rows(got) == _rows(want), decide
    assert want.mult_macs < want.dense_macs // 2  # half the positions skipped, and ReLU zeros on top


class _Gated(nn.Module):
    """Multiplies its weight with torch.matmul: a kind measure has no count for."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(10, 10))

    def forward(self, x):
        return x @ self.gate


def test_a_module_kind_measure_cannot_count_is_named():
    net = nn.Sequential(nn.Linear(4, 10), _Gated(), nn.Linear(10, 2))
    r = sparsify.measure(net, [torch.randn(2, 4)])
    assert [row.name for row in r.layers] == ["0", "2"]
    assert r.uncounted == ["1.gate (_Gated)"]
    assert "not counted" in str(r) and "1.gate (_Gated)" in str(r)
    assert r.to_dict()["uncounted"] == ["1.gate (_Gated)"]
