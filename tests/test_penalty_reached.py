"""A penalty that never reaches the backward pass is said: ``loss + penalty.item()`` and a
``penalty()`` call for logging before the one added to the loss (which then returns 0.0) left
tl1's activations at their unregularized zero fractions (0.508 / 0.468 / 0.498 against 0.857 /
0.811 / 0.997 used rightly) without a word."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

REGULARIZERS = ["tl1", "activation-l1", "activation-hoyer", "dual"]
LOST = "got no gradient before this step"


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def run(recipe, loss_of, steps=6, accumulate=1):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = sparsify.sparsify(net(), recipe, total_steps=8, example_inputs=x[:1])
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=0.01)
    said = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            loss_of(m, x, y).backward()
        opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparsify.step(m)
        said += [str(w.message) for w in caught if LOST in str(w.message)]
    return said


def as_number(m, x, y):
    return F.cross_entropy(m(x), y) + float(sparsify.penalty(m))


def logged_first(m, x, y):
    out = m(x)
    print(float(sparsify.penalty(m)))  # for the log
    return F.cross_entropy(out, y) + sparsify.penalty(m)


def right(m, x, y):
    return F.cross_entropy(m(x), y) + sparsify.penalty(m)


@pytest.mark.parametrize("recipe", REGULARIZERS)
@pytest.mark.parametrize("loop", [as_number, logged_first])
def test_a_penalty_left_out_of_the_loss_is_said_once(recipe, loop):
    said = run(recipe, loop)
    assert len(said) == 1, said


@pytest.mark.parametrize("recipe", REGULARIZERS)
def test_a_penalty_in_the_loss_is_not_said(recipe):
    assert run(recipe, right) == []
    assert run(recipe, right, accumulate=3) == []  # one penalty per micro-batch, each backpropagated


def test_scaled_and_retained_backward_reach_it():
    def scaled(m, x, y):
        loss = (F.cross_entropy(m(x), y) + sparsify.penalty(m)) * 0.5
        loss.backward(retain_graph=True)
        return loss
    assert run("tl1", scaled) == []


def test_terms_of_extra_forwards_dropped_before_the_trained_one_are_not_said():
    """An adversarial attack's forwards record terms whose graphs autograd.grad frees; a loop
    drops them with a penalty() call before the training forward. The dropped tensor never gets
    a gradient, the trained one does: nothing is wrong (a first version warned)."""
    def attacked(m, x, y):
        x_adv = x.clone().requires_grad_()
        grad, = torch.autograd.grad(F.cross_entropy(m(x_adv), y), x_adv)
        sparsify.penalty(m)  # drop the attack's terms
        return F.cross_entropy(m((x + 0.01 * grad.sign()).detach()), y) + sparsify.penalty(m)
    for recipe in REGULARIZERS:
        assert run(recipe, attacked) == [], recipe


NO_GRADIENT = "get no gradient"  # sparsify()'s warning, and sparsify.step's for a penalty with none


def frozen_backbone():
    """Convs frozen, the head trainable: what the probe's model was (tl1's penalty stayed 0.0476, constant)."""
    m = net()
    m[0].requires_grad_(False)
    m[2].requires_grad_(False)
    return m


def train_said(m, steps=5):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    penalties = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = F.cross_entropy(m(x), y)
            p = sparsify.penalty(m)
            penalties.append(p)
            opt.zero_grad()
            (loss + p).backward()
            opt.step()
            sparsify.step(m)
    said = [str(w.message) for w in caught if NO_GRADIENT in str(w.message)]
    return penalties, said


class _GatedByInput(torch.nn.Module):
    """A gate computed from the input alone (Mamba2's gated norm, its gate the network input)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * F.silu(x)


def test_an_activation_of_the_input_alone_is_not_said_to_follow_frozen_layers():
    """No layer computes silu(x) at all: the note said "only frozen layers compute it"."""
    plan = sparsify.plan(_GatedByInput(), "tl1", total_steps=4, example_inputs=torch.randn(2, 8))
    note = next(e.reason for e in plan.entries if e.method == "tl1")
    assert note.startswith("no gradient reaches it: no trainable layer computes it") and "the inputs alone" in note


@pytest.mark.parametrize("recipe", ["tl1", "activation-l1", "dual"])
def test_regularized_activations_after_frozen_layers_are_said_at_sparsify(recipe):
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(frozen_backbone(), recipe, total_steps=10, example_inputs=x)
    said = [str(w.message) for w in caught if NO_GRADIENT in str(w.message)]
    assert len(said) == 1 and said[0].startswith("sparsify: 2 regularized activation(s) get no gradient (first: "), said
    notes = {e.name: e.reason for e in m.sparsify_state.plan.entries if e.method in ("tl1", "activation-l1")}
    assert len(notes) == 2 and all(n.startswith("no gradient reaches it") for n in notes.values()), notes
    assert not any(e.reason.startswith("no gradient") for e in sparsify.plan(net(), recipe, total_steps=10,
                                                                             example_inputs=x).entries)


def test_a_penalty_with_no_gradient_is_said_once_by_step():
    """Frozen after sparsify(), which could not see it: the step says it, once."""
    m = sparsify.sparsify(net(), "tl1", total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    m[0].requires_grad_(False)
    m[2].requires_grad_(False)
    penalties, said = train_said(m)
    assert all(isinstance(p, torch.Tensor) and not p.requires_grad and p > 0 for p in penalties)
    assert len(said) == 1 and said[0].startswith("sparsify.step: the penalty returned by sparsify.penalty() has no "
                                                 "gradient"), said


def test_frozen_before_sparsify_is_said_once_in_all():
    m = sparsify.sparsify(frozen_backbone(), "tl1", total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    assert train_said(m)[1] == []  # sparsify() said it; the steps do not repeat it


def test_eval_and_no_grad_loops_are_not_said():
    m = sparsify.sparsify(net(), "tl1", total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    m[0].requires_grad_(False)
    m[2].requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for train in (False, True):
            m.train(train)
            with torch.no_grad():
                m(x)
                assert sparsify.penalty(m) == 0.0  # nothing recorded without gradients
            sparsify.step(m)
    assert not [w for w in caught if NO_GRADIENT in str(w.message)]
