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
