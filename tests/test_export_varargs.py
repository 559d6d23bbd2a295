"""torch.export capture of a ``forward(self, *xs)``: torch.export matches ``dynamic_shapes`` to the
forward's parameters, so the tensors a ``*args`` parameter takes sit in one nested tuple. A flat
tuple (one entry per tensor) made capture="export" fail ("`inputs` has 1 elements, but
`dynamic_shapes` has 2") and capture="auto" fall back to module-by-module rewriting, where tl1
rewrote nothing. A ``forward(self, *inputs)`` torch.fx traces (it unpacks ``x, y = inputs``)
runs its graph for calls with as many inputs as the example had."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from passes.export_capture import dynamic_spec


class Summed(nn.Module):
    """torch.fx cannot trace it (``sum`` iterates the ``*xs`` proxy)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, *xs):
        return self.b(torch.relu(self.a(sum(xs))))


class Unpacked(nn.Module):
    """torch.fx traces it: unpacking takes the count (two) from the bytecode."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, *inputs):
        x, y = inputs
        return self.fc(torch.relu(self.a(x)) + torch.relu(self.b(y)))


class Scaled(nn.Module):
    """A named parameter before the varargs, a non-tensor last among them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x, *rest):
        return torch.relu(self.a(x * rest[-1] + sum(rest[:-1])))


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def test_the_spec_nests_what_a_star_parameter_takes():
    auto = torch.export.Dim.AUTO
    assert dynamic_spec(Summed(), (X, X)) == (({0: auto, 1: auto}, {0: auto, 1: auto}),)
    assert dynamic_spec(Scaled(), (X, X, 2.0)) == ({0: auto, 1: auto}, ({0: auto, 1: auto}, None))
    assert dynamic_spec(nn.Linear(8, 4), (X,)) == ({0: auto, 1: auto},)


def test_export_captures_a_varargs_forward_and_auto_takes_it():
    for capture in ("export", "auto"):
        plan = sparsify.plan(Summed(), "tl1", total_steps=4, example_inputs=(X, X), capture=capture)
        assert [c["capture"] for c in plan.captures] == ["torch.export"], capture
        assert [e.kind for e in plan.rewritten] == ["relu"], capture


def test_the_exported_varargs_model_equals_the_original_at_other_batch_sizes():
    torch.manual_seed(0)
    for net, args in ((Summed(), (X, X)), (Scaled(), (X, X, 2.0))):
        m = sparsify.sparsify(net, "tl1", total_steps=4, example_inputs=args)
        assert [c["capture"] for c in sparsify.core.state.find_state(m).plan.captures] == ["torch.export"]
        wide = tuple(torch.cat([a, a, a[:1]]) if isinstance(a, torch.Tensor) else a for a in args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the graph serves batch 7: no "called with arguments ..." fallback
            torch.testing.assert_close(m(*wide), net(*wide))
        m(*args).sum().backward()
        assert sparsify.penalty(m).item() > 0  # the relu regularizer ran in the graph


def test_a_traced_varargs_forward_runs_its_graph_for_the_example_call():
    torch.manual_seed(0)
    net, args = Unpacked(), (X, torch.randn(3, 4))
    m = sparsify.sparsify(net, "tl1", total_steps=10, example_inputs=args)
    assert [c["capture"] for c in sparsify.core.state.find_state(m).plan.captures] == ["torch.fx"]
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "called with arguments its graph was not traced for"
        out = m(*args)
    assert sparsify.penalty(m).item() > 0  # the relu regularizers ran in the graph
    torch.testing.assert_close(out, net(*args))
    m.eval()  # tl1 adds nothing outside training: the own forward runs without a warning
    with pytest.raises(ValueError, match="unpack"):  # the own forward's error, not the graph's IndexError
        m(X)
