"""A regularizer strong enough to zero a whole activation is said by the report: tl1 and
activation-l1 at 20x the recipe's lam drove every value of the last map to zero (the output no
longer depended on the input) without a word."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def evaluated(bias: float):
    m = sparsify.sparsify(net(), "tl1", total_steps=4, example_inputs=torch.zeros(1, 8))
    with torch.no_grad():
        m[2].bias.fill_(bias)  # -100: the second ReLU's output is zero for every input
    m.eval()
    with torch.no_grad():
        m(torch.randn(32, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.report(m)
    return [str(w.message) for w in caught if "was zero in the last evaluation" in str(w.message)]


def test_a_silenced_activation_is_said():
    said = evaluated(-100.0)
    assert len(said) == 1 and "every value of 1 regularized activation(s)" in said[0] and "lower the rule's lam" \
        in said[0], said


def test_a_sparse_but_alive_activation_is_not():
    assert evaluated(0.0) == []
