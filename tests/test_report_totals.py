"""``report``'s model-wide totals counted by hand: with two rules at different targets the headline
target weighs each layer by its weights (a mean over layers would say 0.70 where 0.885 is meant)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify

RECIPE = {"version": 1, "name": "two-targets", "rules": [
    {"match": {"type": "Conv2d"}, "method": "magnitude",
     "params": {"sparsity": 0.9, "scope": "layer", "begin": 0, "end": 0}},
    {"match": {"type": "Linear"}, "method": "magnitude",
     "params": {"sparsity": 0.5, "scope": "layer", "begin": 0, "end": 0}}]}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 4))


def test_totals_weigh_each_layer_by_its_weights():
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(_model(), RECIPE, example_inputs=x)
    opt = torch.optim.SGD(sparsify.param_groups(m, 0.0), lr=0.01)
    loss = m(x).pow(2).mean()
    loss.backward()
    opt.step()
    sparsify.step(m, loss)
    rep = sparsify.report(m)
    weights = {n: mod.deployed_weight() for n, mod in m.named_modules() if hasattr(mod, "deployed_weight")}
    assert len(weights) == 4
    targets = {n: 0.9 if w.dim() == 4 else 0.5 for n, w in weights.items()}
    sizes = {n: w.numel() for n, w in weights.items()}
    expected_target = sum(targets[n] * sizes[n] for n in weights) / sum(sizes.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    t = rep.totals
    assert t["target"] == pytest.approx(expected_target)
    assert abs(t["target"] - sum(targets.values()) / 4) > 0.05  # the two means differ on this model
    assert t["weight_sparsity"] == pytest.approx(zeros / sum(sizes.values()))
    # achieved (weights) weighs each layer by its weights too: the same zeros over the same weights
    assert t["achieved"]["weights"] == pytest.approx(zeros / sum(sizes.values()))
    assert t["params"] == sum(p.numel() for p in _model().parameters())
    assert t["nonzero_params"] == t["params"] - zeros - sum(int((p == 0).sum()) for n, p in m.named_parameters()
                                                            if n.endswith("bias"))
    # per layer: each reaches its own rule's target (layer scope: the exact count)
    for row in rep.layers:
        assert row.target == targets[row.name]
        assert row.weight_sparsity == pytest.approx(targets[row.name], abs=1.0 / row.params)


class _TokenLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_a_report_without_macs_says_why():
    """A model of token ids sparsified without example inputs cannot run the guessed float
    sample: the MAC columns are '-', and the report says how to get them."""
    torch.manual_seed(0)
    bare = str(sparsify.report(sparsify.sparsify(_TokenLM(), "gmp", total_steps=4)))
    assert "MACs: '-'" in bare and "example_inputs=" in bare
    # the one reason that applies, not both
    assert "rejected the guessed sample (zeros of shape (1, 8)" in bare and "failed" not in bare
    given = sparsify.report(sparsify.sparsify(_TokenLM(), "gmp", total_steps=4,
                                              example_inputs=torch.zeros(1, 5, dtype=torch.long)))
    assert given.totals["macs"] == 5 * (64 + 80) and "MACs: '-'" not in str(given)


def test_a_report_whose_inputs_fail_says_so(monkeypatch):
    """Example inputs that fail when the report runs them: the warning, then the report's line
    naming that reason (not the missing-inputs one)."""
    import sparsify.stats.macs as macs
    from sparsify.core.state import find_state

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    m = sparsify.sparsify(_TokenLM(), "gmp", total_steps=4, example_inputs=torch.zeros(1, 5, dtype=torch.long))
    find_state(m).layer_factors = None  # measured again by the next report
    monkeypatch.setattr(macs, "positions_per_sample", fail)
    with pytest.warns(UserWarning, match="could not run the example inputs to count MACs"):
        rep = sparsify.report(m)
    assert rep.totals["macs"] is None and rep.totals["macs_missing"].startswith("the example inputs failed")
    assert "failed to run (RuntimeError, as warned)" in str(rep) and "got no example_inputs" not in str(rep)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.fc = nn.GRU(8, 32, batch_first=True), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.gru(x)[0][:, -1])


def test_a_report_says_its_macs_leave_out_weights_multiplied_by_their_own_kernels():
    """A GRU's weights (a fused MoE's experts likewise) stay dense and are not in the Conv/Linear
    MAC counts: '0% fewer' or '90% fewer' would read as the whole model's, so the report says how
    much of the model its MACs leave out."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match="fused kernel") as said:
        m = sparsify.sparsify(_Recurrent(), "gmp", total_steps=4, example_inputs=x)
    report = sparsify.report(m)
    gru = sum(p.numel() for p in m.gru.parameters() if p.dim() == 2)
    # over the weight parameters, as sparsify()'s warning (it was over every parameter, biases too: 96% vs 99%)
    share = gru / (gru + m.fc.weight.numel())
    assert report.totals["uncounted"] == {"share": pytest.approx(share), "first": "gru"}
    warned = str(next(w.message for w in said if "fused" in str(w.message)))
    assert f"{share:.0%} of the model's weight parameters" in warned
    # the same share in the same words: '99%' in one and '98.8%' in the other read as two figures
    assert f"MACs: Conv/Linear layers only; {share:.0%} of the model's weight parameters (first: gru)" in str(report)
    plain = sparsify.report(sparsify.sparsify(_TokenLM(), "gmp", total_steps=4,
                                              example_inputs=torch.zeros(1, 5, dtype=torch.long)))
    assert plain.totals["uncounted"] is None and "Conv/Linear layers only" not in str(plain)


class _SmallRecurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.fc = nn.GRU(2, 2, batch_first=True), nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x) + self.gru(x[..., :2])[0].sum()


def test_weights_of_their_own_kernels_under_5_percent_are_not_said():
    """docs/macs.md: the report says what its MACs leave out when it is 5% of the model's weights or
    more; a GRU holding 0.6% of them is no reason for the line."""
    m = sparsify.sparsify(_SmallRecurrent(), "gmp", total_steps=4, example_inputs=torch.randn(2, 5, 64))
    report = sparsify.report(m)
    gru = sum(p.numel() for p in m.gru.parameters() if p.dim() == 2)
    assert 0 < gru / (gru + m.fc.weight.numel()) < 0.05  # the premise
    assert report.totals["uncounted"] is None and "Conv/Linear layers only" not in str(report)


def test_the_target_is_beside_the_zeros_of_the_same_layers():
    """With SAS (no weight target, its widened weights half zero) beside a 0.9 weight target, the
    summary line printed all layers' zeros beside that target: now it names both populations."""
    recipe = {"version": 1, "name": "sas+magnitude", "rules": [
        {"match": {"type": "Conv2d"}, "method": "sas", "params": {"m": 2, "input": "rewire", "not_relu": "dense"}},
        {"match": {"type": "Linear"}, "method": "magnitude", "params": {"sparsity": 0.9, "begin": 0, "end": 0}}]}
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(_model(), recipe, example_inputs=x)
    sparsify.step(m)
    rep = sparsify.report(m)
    t = rep.totals
    line = next(s for s in str(rep).splitlines() if s.startswith("sparsified layers"))
    assert (f"sparsified layers: {100 * t['weight_sparsity']:.1f}% of their weights are zero; the 2 layers with a "
            "weight target: 90.0% (target now 90.0%); ") in line
    assert t["targeted_layers"] == 2 and t["target"] == pytest.approx(0.9)
    assert t["targeted_weight_sparsity"] == pytest.approx(0.9, abs=0.01) and t["weight_sparsity"] < 0.85
    alone = str(sparsify.report(sparsify.sparsify(_model(), RECIPE, example_inputs=x)))
    assert "% of their weights are zero (target now " in alone
