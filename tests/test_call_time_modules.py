"""A module made at call time (``nn.GELU()(x)``, transformers' ``ACT2FN["gelu"](x)`` in DeBERTa's
pooler and some 60 other places) has no name in the model: torch.fx's tracer raised NameError on
it, the module calling it was kept untraced, and its activation silently got no regularizer. Its
code is traced inline now, as a function's would be."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


class Pool(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.dense, self.make = nn.Linear(8, 8), make

    def forward(self, x):
        return self.make()(self.dense(x[:, 0]))


class Root(nn.Module):
    """Untraceable (it branches on its input), so its children are traced one by one."""

    def __init__(self, make):
        super().__init__()
        self.enc, self.pool, self.head = nn.Linear(8, 8), Pool(make), nn.Linear(8, 3)

    def forward(self, x):
        h = self.enc(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(self.pool(h))


def _act2fn():
    transformers = pytest.importorskip("transformers.activations",
                                       reason="transformers is not installed (pip install fx-sparsify[integrations])")
    return lambda: transformers.ACT2FN["gelu"]


@pytest.mark.parametrize("maker", ["nn.GELU", "ACT2FN"])
def test_an_activation_made_at_call_time_is_regularized(maker):
    make = nn.GELU if maker == "nn.GELU" else _act2fn()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Root(make)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable root: expected
        plan = sparsify.plan(model, "activation-l1", example_inputs=x)
        m = sparsify.sparsify(model, "activation-l1", total_steps=3, example_inputs=x)
    assert [e.name for e in plan.rewritten] == ["pool.gelu"]
    assert "pool" not in {f["name"] for f in plan.fallbacks}
    loss = F.cross_entropy(m(x), torch.tensor([0, 1]))
    penalty = sparsify.penalty(m)
    assert float(penalty) > 0  # the activation's term is in
    (loss + penalty).backward()
    sparsify.step(m, loss.detach())
    final = sparsify.finalize(m)
    with torch.no_grad():
        torch.testing.assert_close(final(x), m.eval()(x))
