"""A sweep over recipes on one model: ``sparsify`` copies no weights, so ``sparsify(base, r2)``
after training ``sparsify(base, r1)`` starts from r1's trained (and pruned) weights. It warns,
and says to pass ``copy=True`` (docs/index.md#sparsify). Re-sparsifying weights nothing changed
stays quiet."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
SAID = "were trained through a model sparsify() returned earlier"


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(model, steps=2, **opt_kw):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, **opt_kw)
    for _ in range(steps):
        F.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(model)


def said(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if SAID in str(w.message)]


def test_a_sweep_is_told_it_reuses_the_trained_weights():
    net = base()
    first = sparsify.sparsify(net, "gmp", total_steps=2, begin=0, end=1)
    train(first)
    messages = said(lambda: sparsify.sparsify(net, "st3", total_steps=2))
    assert len(messages) == 1 and "copy=True" in messages[0]


def test_the_previous_model_need_not_be_alive():
    net = base()
    first = sparsify.sparsify(net, "gmp", total_steps=2, begin=0, end=1)
    train(first)
    del first
    gc.collect()
    assert len(said(lambda: sparsify.sparsify(net, "st3", total_steps=2))) == 1


def test_a_fused_optimizer_is_seen_through_the_living_models_step():
    net = base()
    first = sparsify.sparsify(net, "st3", total_steps=2)
    train(first, fused=True)
    assert len(said(lambda: sparsify.sparsify(net, "gmp", total_steps=2))) == 1


def test_copying_the_trained_weights_is_no_way_out():
    """``copy=True`` on the second call copies weights the first run trained: still said."""
    net = base()
    train(sparsify.sparsify(net, "gmp", total_steps=2, begin=0, end=1))
    assert len(said(lambda: sparsify.sparsify(net, "st3", total_steps=2, copy=True))) == 1


@pytest.mark.parametrize("how", ["untrained", "copy-first"])
def test_weights_nothing_changed_are_quiet(how):
    net = base()
    before = [p.detach().clone() for p in net.parameters()]
    first = sparsify.sparsify(net, "gmp", total_steps=2, copy=how == "copy-first")
    if how != "untrained":
        train(first)
    assert said(lambda: sparsify.sparsify(net, "st3", total_steps=2)) == []
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
