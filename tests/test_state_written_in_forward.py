"""A forward that updates its module's state (a hand-written running mean, a call counter) keeps
updating it: torch.fx ran the update once at trace time and froze it, so such a module runs its
own forward, and sparsify() leaves the user's model as it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


class CopiedMean(nn.Module):
    """A running mean written with ``copy_`` of a detached statistic (a custom norm layer)."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("rmean", torch.zeros(8))

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.training:
            self.rmean.copy_(0.9 * self.rmean + 0.1 * h.detach().mean(0))
        return self.fc(h - self.rmean)


class NoGradMean(nn.Module):
    """The same in place under no_grad, with a counter buffer and a plain number attribute."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("rmean", torch.zeros(8))
        self.register_buffer("n", torch.zeros((), dtype=torch.long))
        self.calls = 0

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.training:
            with torch.no_grad():
                self.rmean.mul_(0.9).add_(0.1 * h.mean(0))
                self.n += 1
            self.calls += 1
        return self.fc(h - self.rmean)


class InPlaceMean(nn.Module):
    """The same in place with grad on (the statistic detached), and a counter buffer."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("rmean", torch.ones(8))
        self.register_buffer("n", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.training:
            self.rmean.mul_(0.9).add_(0.1 * h.detach().mean(0))
            self.n += 1
        return self.fc(h - self.rmean)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls = self.calls + 1
        return self.a(F.relu(x)) * 2


class Counted(nn.Module):
    """Only the counting child runs its own forward: the root keeps its graph."""

    def __init__(self):
        super().__init__()
        self.l, self.c, self.fc = nn.Linear(8, 8), Counter(), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.c(self.l(x)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        {k: v for k, v in vars(m).items() if isinstance(v, (int, float))} for m in model.modules()]


def _same(a, b):
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.parametrize("example", [True, False])
@pytest.mark.parametrize("net", [CopiedMean, InPlaceMean, NoGradMean, Counted])
def test_sparsify_leaves_the_users_state_unchanged(net, example):
    """The trace ran the update on the real module, whose tensors the sparse model shares: the
    user's buffer moved (calls 0 -> 1), although sparsify changes nothing of the user's model."""
    torch.manual_seed(0)
    model = net()
    before = _state(model)
    kw = {"example_inputs": torch.randn(4, 8)} if example else {}
    sparsify.sparsify(model, "gmp", total_steps=10, **kw)
    assert _same(_state(model), before)


@pytest.mark.parametrize("recipe", ["gmp", "activation-l1"])
@pytest.mark.parametrize("net", [CopiedMean, InPlaceMean, NoGradMean])
def test_the_running_mean_accumulates_like_the_users(net, recipe):
    """The graph held ``0.9 * rmean`` as a constant from trace time: the mean never accumulated
    and the outputs drifted from the user's model from the second forward on."""
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    dense = net()
    torch.manual_seed(0)
    sparse = sparsify.sparsify(net(), recipe, total_steps=100, example_inputs=x)
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), dense(x))
    torch.testing.assert_close(sparse.rmean, dense.rmean)
    dense.eval(), sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))


def test_three_training_steps_run_and_count():
    """Under no_grad, the buffer updated at trace time became a constant that required grad:
    the second step raised 'Trying to backward through the graph a second time'."""
    x = torch.randn(4, 8)
    sparse = sparsify.sparsify(NoGradMean(), "gmp", total_steps=10, example_inputs=x)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for _ in range(3):
        loss = sparse(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(sparse)
    assert (int(sparse.n), sparse.calls, sparse.rmean.requires_grad) == (3, 3, False)


def test_a_counting_child_runs_its_own_forward_and_the_plan_says_why():
    x = torch.randn(2, 8)
    sparse = sparsify.sparsify(Counted(), "gmp", total_steps=10, example_inputs=x)
    sparse(x), sparse(x)
    assert sparse.c.calls == 2
    assert isinstance(sparse, torch.fx.GraphModule)  # only the counting module runs its own forward
    plan = str(sparsify.plan(Counted(), "gmp", total_steps=10, example_inputs=x))
    assert "c: StateWriteInGraph: writes module state in its forward (assigns calls)" in plan, plan


class BufferCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.a(F.relu(x)) * 2


class BufferCounted(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.c, self.fc = nn.Linear(8, 8), BufferCounter(), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.c(self.l(x)))


@pytest.mark.parametrize("recipe", ["gmp", "activation-l1"])
def test_an_in_place_buffer_write_is_a_node_of_the_graph(recipe):
    """``self.calls += 1`` on a buffer ran once at trace time, on the user's buffer (0 -> 1), and
    never again: the graph now holds the write itself, and the whole model keeps its graph."""
    model = BufferCounted()
    sparse = sparsify.sparsify(model, recipe, total_steps=10, example_inputs=torch.randn(2, 8))
    assert int(model.c.calls) == 0
    sparse(torch.randn(2, 8)), sparse(torch.randn(2, 8))
    assert int(sparse.c.calls) == 2
    assert "untraceable" not in str(sparsify.plan(BufferCounted(), recipe, total_steps=10,
                                                  example_inputs=torch.randn(2, 8)))
