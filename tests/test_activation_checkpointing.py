"""Penalty methods under activation checkpointing (``torch.utils.checkpoint``; what transformers'
``gradient_checkpointing_enable`` does): the recomputation inside backward records nothing, so the
penalty and the gradients equal the run without checkpointing and no "never collected" warning
appears; with reentrant checkpointing, which runs the first forward without gradients, the term
cannot reach the loss and a warning says what to do."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sparsify
from sparsify.core.layers import SparseWeightMixin

PENALTY_RECIPES = ["tl1", "activation-l1", "activation-hoyer", "dual"]
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


class Net(nn.Module):
    def __init__(self, reentrant=None):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.block = Block()
        self.fc = nn.Linear(8, 4)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x):
        x = self.relu(self.stem(x))
        if self.reentrant is None:
            x = self.block(x)
        else:
            x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.fc(x.mean((2, 3)))


def one_step(recipe, reentrant):
    torch.manual_seed(0)
    # dual, unstaged: its l1 phase (steps 0-1 of 4) adds l1 * sum|W| of every layer, block.conv
    # included, and its tl1 rule runs from step 0 too
    kw = dict(stage=None, begin=0, end=4, prune_at=1.0, l1=1e-2) if recipe == "dual" else {"lam": 0.5}
    model = sparsify.sparsify(Net(reentrant), recipe, total_steps=8, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = F.cross_entropy(model(X), Y)
        penalty = sparsify.penalty(model)
        (task + penalty).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        sparsify.step(model)
    said = [str(w.message) for w in caught if "sparsify" in str(w.message)]
    return float(penalty), grads, said


@pytest.mark.parametrize("recipe", PENALTY_RECIPES)
def test_non_reentrant_checkpointing_records_each_term_once(recipe):
    plain_penalty, plain_grads, plain_said = one_step(recipe, None)
    ck_penalty, ck_grads, said = one_step(recipe, False)
    assert plain_penalty > 0 and ck_penalty == plain_penalty
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain_grads, ck_grads))
    assert said == plain_said == []


@pytest.mark.parametrize("recipe", PENALTY_RECIPES)
def test_reentrant_checkpointing_says_the_term_is_lost(recipe):
    plain_penalty, _, _ = one_step(recipe, None)
    penalty, _, said = one_step(recipe, True)
    assert penalty < plain_penalty  # the checkpointed block's term is missing
    # one line per group whose terms were lost (dual: its l1-prune and tl1 rules)
    assert said and all("use_reentrant=False" in m and "never reached the loss" in m for m in said)
    assert any(f"the {'l1-prune' if recipe == 'dual' else recipe} " in m for m in said)


@pytest.mark.parametrize("recipe", ["st3", "tl1"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_sparsify_keeps_the_checkpointing(recipe, reentrant):
    """Traced through, ``checkpoint(self.block, x)`` would leave a graph without the recomputation:
    the module calling it runs its own forward instead, and the plan says why."""
    plan = sparsify.plan(Net(reentrant), recipe)
    assert any(c["name"] == "" and "torch.utils.checkpoint" in c["note"] for c in plan.captures)
    model = sparsify.sparsify(Net(reentrant), recipe, total_steps=8)
    calls = []
    model.block.register_forward_pre_hook(lambda m, args: calls.append(torch.is_grad_enabled()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant + tl1: the lost-term warning, tested above
        F.cross_entropy(model(X), Y).backward()
        sparsify.step(model)
    assert len(calls) == 2  # the forward, and its recomputation in backward
    assert any(isinstance(m, SparseWeightMixin) for m in model.block.modules()) == (recipe == "st3")


def test_a_checkpoint_partial_stored_on_the_module_is_refused_too():
    """transformers keeps ``self._gradient_checkpointing_func = partial(checkpoint, **kwargs)``."""
    import functools

    from torch.utils import checkpoint as cp

    class Held(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = Block(), nn.Linear(8, 4)
            self._gradient_checkpointing_func = functools.partial(cp.checkpoint, use_reentrant=False)

        def forward(self, x):
            return self.fc(self._gradient_checkpointing_func(self.block, torch.relu(x)).mean((2, 3)))

    net = Held()
    plan = sparsify.plan(net, "tl1")
    assert any(c["name"] == "" and "torch.utils.checkpoint" in c["note"] for c in plan.captures)
    assert net._gradient_checkpointing_func.func is cp.checkpoint  # put back after tracing


def test_export_capture_refuses_a_forward_that_checkpoints():
    """``torch.export`` would inline the checkpointed function as well: ``capture="export"`` fails
    with one line saying why, and ``auto`` keeps torch.fx with its fallback."""
    with pytest.raises(ValueError, match=r'torch\.utils\.checkpoint.*capture="fx"'):
        sparsify.sparsify(Net(False), "tl1", example_inputs=X, total_steps=8, capture="export")
    plan = sparsify.plan(FunctionalNet(False), "tl1", example_inputs=X)
    assert any("torch.utils.checkpoint" in note for note in plan.capture_notes)
    assert "torch.export" not in {c["capture"] for c in plan.captures}
    # with every activation a module, module by module reaches them all: export is not even tried
    plan = sparsify.plan(Net(False), "tl1", example_inputs=X)
    assert any("calls no function a rule inserts after" in note for note in plan.capture_notes)


class FunctionalNet(Net):
    def forward(self, x):
        x = F.relu(self.stem(x))  # a functional relu in the untraceable forward: export could reach it
        return self.fc(checkpoint(self.block, x, use_reentrant=self.reentrant).mean((2, 3)))


def test_checkpoint_sequential_is_kept_too():
    """Reached through another module's globals (``checkpoint_sequential`` calls ``checkpoint``
    inside torch.utils.checkpoint; timm's ``checkpoint_seq`` does the same from timm)."""
    from torch.utils.checkpoint import checkpoint_sequential

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(checkpoint_sequential(self.body, 2, x, use_reentrant=False).mean((2, 3)))

    model = sparsify.sparsify(Seq(), "st3", total_steps=4)
    calls = []
    model.body[0].register_forward_pre_hook(lambda *args: calls.append(1))
    F.cross_entropy(model(X), torch.tensor([0, 1, 2, 3])).backward()
    assert len(calls) == 2


def test_a_checkpointing_switch_turned_on_after_sparsify_is_followed():
    """timm's ``set_grad_checkpointing(True)`` after ``sparsify``: the graph was traced with the
    switch off, so a call with it on runs the module's own forward, which checkpoints."""
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3, padding=1), Block(), nn.Linear(8, 4)
            self.grad_checkpointing = False

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = checkpoint(self.block, x, use_reentrant=False) if self.grad_checkpointing else self.block(x)
            return self.fc(x.mean((2, 3)))

    model = sparsify.sparsify(Switch(), "st3", total_steps=4)
    calls = []
    model.block.conv.register_forward_pre_hook(lambda *args: calls.append(1))
    for on, expected in ((False, 1), (True, 2)):
        model.grad_checkpointing = on
        calls.clear()
        F.cross_entropy(model(X), Y).backward()
        assert len(calls) == expected
    assert model._call_guard.modes == {("", "grad_checkpointing"): False}


def test_looking_for_checkpoint_in_imported_modules_warns_about_nothing():
    """The scan reads every imported module's globals; some (torch.distributed.reduce_op) warn
    when their class is asked for, and a warning while tracing is reported as a tracing problem."""
    import torch.distributed  # noqa: F401  (holds the deprecated reduce_op)

    from passes import checkpoint_guard
    checkpoint_guard._MODULES["count"] = -1  # scan again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spaces = checkpoint_guard._module_namespaces()
    assert any(s is vars(torch.utils.checkpoint) for s in spaces)
