"""A module called several times is one layer: a method converts it only when every call
qualifies; otherwise it stays dense, ``plan`` says why and a warning says so."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify

X = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))


class CalledTwice(nn.Module):
    """``conv`` is called on a relu output and, when ``mixed``, also on a value that is not one."""

    def __init__(self, mixed: bool):
        super().__init__()
        self.mixed = mixed
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        other = h if self.mixed else torch.relu(-h)
        return self.conv(torch.relu(h)) + self.conv(other)


def test_sas_leaves_a_layer_dense_when_one_call_is_not_fed_by_a_relu():
    model = CalledTwice(mixed=True)
    ref = model(X)
    plan = sparsify.plan(model, "sas", example_inputs=(X,), total_steps=10)
    notes = [e.reason for e in plan.entries if e.name == "conv"]
    assert len(notes) == 2 and all("called 2 times" in n and "every call" in n for n in notes), notes
    with pytest.warns(UserWarning, match="conv stays dense: called 2 times"):
        sparse = sparsify.sparsify(model, "sas", example_inputs=(X,), total_steps=10)
    assert type(sparse.get_submodule("conv")) is nn.Conv2d
    assert torch.equal(sparse(X), ref)  # nothing changed at step 0


def test_sas_converts_a_layer_when_every_call_is_fed_by_a_relu():
    model = CalledTwice(mixed=False)
    ref = model(X)
    sparse = sparsify.sparsify(model, "sas", example_inputs=(X,), total_steps=10)
    assert type(sparse.get_submodule("conv")) is not nn.Conv2d
    assert [e.method for e in sparsify.plan(model, "sas", example_inputs=(X,), total_steps=10).entries
            if e.name == "conv"] == ["sas", "sas"]
    torch.testing.assert_close(sparse(X), ref, rtol=1e-5, atol=1e-6)  # relu coefficients: the same output


class TwiceWithFrozenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.head.requires_grad_(False)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(self.stem(x)))))


def test_a_layer_called_twice_counts_once_in_the_plans_shares():
    """``fc`` (64 weights) is called twice, one layer: the plan's shares, its count of sites and the
    share its frozen-layer warning gives are over 32 + 64 + 16 weights, not with ``fc`` per call."""
    rules = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}
    plan = sparsify.plan(TwiceWithFrozenHead(), rules, example_inputs=torch.zeros(1, 4))
    assert [e.name for e in plan.entries].count("fc") == 2  # the premise: an entry per call
    assert plan.shares()["param_share"] == pytest.approx((32 + 64) / (32 + 64 + 16))
    assert "2 sites rewritten, 1 weight layers left dense; rewritten layers hold 85.7%" in str(plan)
    said = [w for w in plan.warnings(sparsify.load_recipe(rules)) if "frozen layer(s)" in w]
    assert len(said) == 1 and "14% of the model's weight parameters" in said[0], said



def test_the_plans_table_gives_a_layers_weights_and_macs_in_its_first_row_only():
    """Each row of a layer called twice gave its whole weights and summed MACs: the table read as two
    layers of the same size."""
    rules = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}
    plan = sparsify.plan(TwiceWithFrozenHead(), rules, example_inputs=torch.zeros(1, 4))
    rows = [line.split() for line in str(plan).splitlines() if line.startswith("fc ")]
    assert len(rows) == 2 and rows[0][4] == "64" and rows[1][4:7] == ["call", "2", "of"], rows
