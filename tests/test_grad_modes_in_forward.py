"""A forward that switches the gradient mode (``torch.no_grad`` and its siblings) keeps the switch:
torch.fx tracing drops it, so such a module runs its own forward (or torch.export captures it)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


def _frozen_branch(switch):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            with switch():
                g = self.b(h)  # a branch the user does not train
            return self.fc(torch.cat([h, g], 1))
    return Net


class Inner(nn.Module):
    """Trains only when asked, inside a parent torch.fx traces: the parent keeps its graph."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 8)

    @torch.no_grad()
    def forward(self, h):
        return self.b(h)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.inner, self.fc = nn.Linear(8, 8), Inner(), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.fc(h + self.inner(h))


SWITCHES = {"no_grad": torch.no_grad, "set_grad_enabled": lambda: torch.set_grad_enabled(False),
            "inference_mode": torch.inference_mode}


def _grads(model, x):
    out = model(x)
    if out.requires_grad:
        out.sum().backward()
    return {n: p.grad is not None for n, p in model.named_parameters()}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("recipe", ["gmp", "activation-l1"])
def test_a_no_grad_branch_gets_no_gradient(switch, recipe):
    """The graph dropped the ``with``: b.weight.grad was None in the user's model and set in the
    sparse one, silently, with every recipe."""
    Net = _frozen_branch(SWITCHES[switch])
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    dense = Net()
    torch.manual_seed(0)
    sparse = sparsify.sparsify(Net(), recipe, total_steps=10, example_inputs=x)
    assert _grads(sparse, x) == _grads(dense, x)
    assert _grads(dense, x)["b.weight"] is False


def test_the_plan_names_the_grad_mode_and_a_parent_keeps_its_graph():
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    dense = Outer()
    torch.manual_seed(0)
    sparse = sparsify.sparsify(Outer(), "gmp", total_steps=10, example_inputs=x)
    assert _grads(sparse, x) == _grads(dense, x)
    assert _grads(dense, x)["inner.b.weight"] is False
    assert isinstance(sparse, torch.fx.GraphModule)  # only the switching module runs its own forward
    plan = str(sparsify.plan(Outer(), "gmp", total_steps=10, example_inputs=x))
    assert "inner: GradModeInGraph: switches the gradient mode" in plan, plan


@pytest.mark.parametrize("recipe", ["gmp", "activation-l1"])
def test_enable_grad_inside_forward_is_kept(recipe):
    """A forward that builds a graph for gradients of its own (an energy model) even under the
    caller's no_grad: the traced graph dropped the switch and returned a tensor without one."""
    class Energy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 1)

        def forward(self, x):
            with torch.enable_grad():
                return self.fc(torch.relu(self.a(x)).mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    sparse = sparsify.sparsify(Energy(), recipe, total_steps=10, example_inputs=x)
    with torch.no_grad():
        assert Energy()(x).requires_grad and sparse(x).requires_grad


class _Gated(nn.Module):
    """Mamba2's gated norm: unpacks its input's shape, which torch.fx answers from example values."""

    def forward(self, x, gate=None):
        h = x * F.silu(gate)
        *pre, last = h.shape
        return h.view(*pre, 2, last // 2).flatten(-2)


class _Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.proj = nn.Linear(4, 8), _Gated(), nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        a, b = self.lin(x).chunk(2, -1)
        for _ in a:  # torch.fx cannot iterate a proxy: the mixer runs its own forward, its children are traced
            pass
        return self.proj(self.norm(a, gate=b))


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer, self.head = _Mixer(), nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.mixer(x))


def test_example_inputs_fetched_while_tracing_are_not_the_forwards_grad_mode_switch():
    """A module traced a second time fetches its example inputs from a forward of the whole model,
    run without gradients while the trace is under way: that switch was taken for the module's
    own, the module ran its own forward and its activation got no node (Mamba2's gated norm, tl1:
    penalty 0, "matched nothing")."""
    plan = sparsify.plan(_Mixed(), "tl1", total_steps=4, example_inputs=torch.randn(2, 3, 4), capture="fx")
    assert [(e.name, e.method) for e in plan.entries if e.method] == [("mixer.norm.silu", "tl1")]
    assert [f["name"] for f in plan.fallbacks] == ["mixer"]
    assert plan.unmatched_rules == []


def test_a_rule_whose_only_matches_were_in_graphs_given_up_matched_nothing(monkeypatch):
    """Nodes matched in a graph that the capture's second trace gave up (the module then runs its
    own forward) got nothing inserted: the rule is said to match nothing, with where its matches
    were, not taken for one that matched."""
    from passes import example_values
    real, traced = example_values.ExampleValues._arguments, []

    def arguments(self):  # the gated norm switches the gradient mode in every trace after the first
        if self._bound is None and isinstance(self._root, _Gated):
            traced.append(1)
            if len(traced) > 1:
                torch.set_grad_enabled(torch.is_grad_enabled())
        return real(self)
    monkeypatch.setattr(example_values.ExampleValues, "_arguments", arguments)
    plan = sparsify.plan(_Mixed(), "tl1", total_steps=4, example_inputs=torch.randn(2, 3, 4), capture="fx")
    assert len(traced) == 2 and [e.name for e in plan.entries if e.method] == []
    assert plan.unmatched_rules == [0]
    assert "mixer.norm, which torch.fx traced and then gave up" in plan.unmatched_hints[0]
