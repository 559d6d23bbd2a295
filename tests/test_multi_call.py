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
