"""Regression guards for sparsify.stats (activation_stats, measure's functional reads, MAC counts,
report totals) and sparsify.api's argument checks, each pinned to a mutation that once survived
the suite."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.stats.runstats import activation_stats


def _effective_by_unfold(conv: nn.Conv2d, x: torch.Tensor, pad=None) -> float:
    """Pairs (non-zero weight, non-zero input) summed over the batch, zero padding counted non-zero."""
    if pad is not None:
        x = F.pad(x, pad, value=1.0)
    cols = F.unfold(x, conv.kernel_size, stride=conv.stride, dilation=conv.dilation)
    w = conv.weight.reshape(conv.out_channels, -1)
    return float(((w != 0).float() @ (cols != 0).float()).sum())


def test_activation_stats_pads_rectangular_padding_on_the_right_axes():
    """A conv with padding=(0, 1) on dense inputs has effective MACs equal to its dense MACs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=(0, 1)))
    s = activation_stats(net, [torch.randn(2, 2, 6, 8) + 10.0])
    assert s["dense_macs"] == 3 * 2 * 9 * 4 * 8
    assert s["effective_macs"] == pytest.approx(s["dense_macs"])


def test_activation_stats_count_input_zeros_of_a_valid_padded_conv():
    """padding="valid" is counted exactly: input zeros after a ReLU lower the effective MACs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding="valid")
    net = nn.Sequential(nn.ReLU(), conv)
    x = torch.randn(2, 2, 7, 7)
    s = activation_stats(net, [x])
    expect = _effective_by_unfold(conv, torch.relu(x)) / 2
    assert s["effective_macs"] == pytest.approx(expect)
    assert s["effective_macs"] < s["dense_macs"]


def test_activation_stats_reflect_padded_conv_counts_nonzero_weight_macs():
    """A conv with non-zero padding mode is counted at its non-zero-weight MACs, as the module docs say."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        conv.weight[:, 0] = 0
    net = nn.Sequential(nn.ReLU(), conv)
    s = activation_stats(net, [torch.randn(4, 2, 5, 5)])
    assert s["effective_macs"] == pytest.approx(int(torch.count_nonzero(conv.weight)) * 25)


def test_activation_stats_conv1d_effective_macs_are_per_sample():
    """Layers counted at their non-zero-weight MACs (Conv1d) report them per sample, whatever the batch size."""
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3)
    with torch.no_grad():
        conv.weight[conv.weight.abs() < 0.1] = 0
    net = nn.Sequential(conv)
    one = activation_stats(net, [torch.randn(1, 4, 10)])
    many = activation_stats(net, [torch.randn(5, 4, 10)])
    nnz = int(torch.count_nonzero(conv.weight))
    assert one["effective_macs"] == pytest.approx(nnz * 8)
    assert many["effective_macs"] == pytest.approx(nnz * 8)


def _sparse_linear():
    return sparsify.sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "st3", begin=0, end=0,
                             fix=None, example_inputs=torch.zeros(1, 4))


def test_param_groups_refuse_an_infinite_weight_decay():
    """param_groups(model, inf) is refused with a one-line ValueError, not handed to the optimizer."""
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got inf"):
        sparsify.param_groups(_sparse_linear(), float("inf"))


def test_param_groups_take_a_zero_weight_decay():
    """weight_decay=0 is a valid value: every parameter gets 0."""
    groups = sparsify.param_groups(_sparse_linear(), 0)
    assert groups and {g["weight_decay"] for g in groups} == {0.0}


def _failing_mac_count(monkeypatch):
    """A sparsified model whose report must count MACs itself, with the hidden-weight pass failing."""
    import sparsify.stats.macs as macs
    from sparsify.core.state import find_state
    m = _sparse_linear()
    find_state(m).layer_factors = None  # as when no forward measured them in sparsify()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom")
    monkeypatch.setattr(macs, "hidden_positions", broken)
    return m, calls


def test_report_shows_no_macs_when_counting_them_fails_part_way(monkeypatch):
    """When the MAC-counting forward fails, report() warns and shows no MACs, never partial totals."""
    m, _ = _failing_mac_count(monkeypatch)
    with pytest.warns(UserWarning, match="could not run the example inputs to count MACs"):
        rep = sparsify.report(m)
    assert rep.totals["macs"] is None and rep.totals["nonzero_macs"] is None
    assert all(r.macs is None for r in rep.layers)


def test_report_tries_a_failed_mac_count_once(monkeypatch):
    """A failed MAC count is remembered: later reports run no forward again (and warn no more)."""
    m, calls = _failing_mac_count(monkeypatch)
    with pytest.warns(UserWarning, match="could not run the example inputs"):
        sparsify.report(m)
    sparsify.report(m)
    sparsify.report(m)
    assert len(calls) == 1


def test_activation_stats_sas_input_sparsity_is_that_of_its_slots():
    """A SAS layer (m=2) reading dense pre-activations reports the sparsity of its slots: one of two is zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 6)
    m = sparsify.sparsify(net, "sas", example_inputs=x[:1])
    assert type(m.get_submodule("2")).__name__ == "SASLinear"
    s = activation_stats(m, [x])
    assert s["layers"]["2"]["input_sparsity"] == pytest.approx(0.5)
    assert s["layers"]["4"]["input_sparsity"] == pytest.approx(0.5)
    assert s["activation_sparsity"] == pytest.approx(0.5)


def test_measure_refuses_zero_max_batches():
    """measure(max_batches=0) is refused by the argument check, naming max_batches, not run on nothing."""
    net = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="max_batches is how many batches to run, an int >= 1.*got 0"):
        sparsify.measure(net, [torch.randn(2, 4)], max_batches=0)
    assert sparsify.measure(net, [torch.randn(2, 4)] * 3, max_batches=1).samples == 2


def test_measure_reflect_padded_conv_counts_its_padding_as_the_reflected_inputs():
    """measure() on a reflect-padded conv with no zero input counts every multiply: mult MACs equal dense MACs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    r = sparsify.measure(net, [torch.randn(2, 2, 5, 5) + 10.0])
    assert r.dense_macs == 3 * 2 * 9 * 25
    assert r.mult_macs == r.dense_macs


def test_report_target_total_weighs_layers_by_parameters():
    """The report's overall target is the parameter-weighted mean of the layers' targets."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 64))
    recipe = {"version": 1, "rules": [
        {"match": {"name": "0"}, "method": "st3", "params": {"sparsity": 0.5, "begin": 0, "end": 0, "fix": None}},
        {"match": {"name": "2"}, "method": "st3", "params": {"sparsity": 0.9, "begin": 0, "end": 0, "fix": None}}]}
    m = sparsify.sparsify(net, recipe, example_inputs=torch.zeros(1, 4))
    rep = sparsify.report(m)
    assert {r.name: r.target for r in rep.layers} == {"0": pytest.approx(0.5), "2": pytest.approx(0.9)}
    assert rep.totals["target"] == pytest.approx((0.5 * 16 + 0.9 * 256) / 272)


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.emb.weight  # tied: listed once, under the embedding's name

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_report_counts_a_tied_sparsified_weight_once():
    """A sparsified head tied to an embedding counts its non-zeros once, as its effective weight."""
    recipe = {"version": 1, "rules": [{"match": {"name": "head"}, "method": "st3",
                                       "params": {"sparsity": 0.5, "begin": 0, "end": 0, "fix": None}}]}
    m = sparsify.sparsify(_TiedHead(), recipe, example_inputs=torch.zeros(1, 3, dtype=torch.long))
    rep = sparsify.report(m)
    (row,) = rep.layers
    assert (row.params, row.nonzero_params) == (80, 40)
    assert rep.totals["params"] == 90
    assert rep.totals["nonzero_params"] == 40 + int(torch.count_nonzero(m.head.bias))


def test_report_leaves_strs_layer_thresholds_out_of_the_parameter_count():
    """STR's per-layer thresholds (layer.s) are the method's, not the model's: report() counts the model's 67."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m = sparsify.sparsify(net, "str", example_inputs=torch.zeros(1, 4), total_steps=10)
    assert any(n.endswith(".s") for n, _ in m.named_parameters())
    totals = sparsify.report(m).totals
    assert totals["params"] == 4 * 8 + 8 + 8 * 3 + 3
    assert totals["nonzero_params"] <= totals["params"]


@pytest.mark.parametrize("key", ["inplace", "copy"])
def test_sparsify_refuses_an_int_for_inplace_or_copy(key):
    """inplace=1 / copy=0 (an int, not a bool) is refused with a TypeError naming the argument."""
    with pytest.raises(TypeError, match=f"{key} must be True or False, got int 1"):
        sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "st3", total_steps=10, **{key: 1})


def test_param_groups_take_one_suffix_as_a_whole_string():
    """no_decay="0.bias" exempts that one parameter, not every name ending in one of its letters."""
    m = _sparse_linear()
    groups = sparsify.param_groups(m, 0.1, no_decay="0.bias")
    exempt = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert [id(p) for p in exempt] == [id(m.get_submodule("0").bias)]

