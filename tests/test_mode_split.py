"""Modules whose forward branches on ``self.training`` and wrap an activation (timm's
``BatchNormAct2d``: batch norm's training branch, then ``self.act``).

Inlined into the model's graph, such a module made the whole graph hold the training branch, so
every eval call ran the model's own forward, without the nodes a recipe inserted: under tl1 on timm
efficientnet_b0 and rexnet_100 (46-49 activations, each inside a ``BatchNormAct2d``), ``measure``
counted no activation and ``report`` showed none, with no word. Such a module now runs as it is
in both modes, its activation in a graph of its own (passes/mode_branches.py, ``mode_split``)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, in short: batch norm's mode branch, then the activation."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.training:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)
        else:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), BNAct(8), nn.Conv2d(8, 8, 3), BNAct(8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def trained(model, recipe, x=X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=x)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(m(x), Y) + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m, loss)
    return m


@pytest.mark.parametrize("recipe", ["tl1", "activation-l1", "dual"])
def test_eval_forwards_run_the_nodes_after_a_mode_branching_modules_activation(recipe):
    m = trained(net(), recipe)
    regs = [mod for mod in m.modules() if type(mod).__name__ == "ActivationRegularizer"]
    assert len(regs) == 2
    calls = []
    hooks = [r.register_forward_hook(lambda *a: calls.append(1)) for r in regs]
    m.eval()
    with torch.no_grad():
        m(X)
    for h in hooks:
        h.remove()
    assert len(calls) == 2  # none ran in eval before
    rows = {row.name: row for row in sparsify.report(m).layers if row.sparsifies == "activations"}
    assert len(rows) == 2 and all(row.achieved is not None and row.achieved > 0.2 for row in rows.values())
    measured = sparsify.measure(m, [(X, Y)], max_batches=1)
    assert len(measured.nodes) == 2 and measured.zero_fraction > 0.2
    plan = sparsify.plan(net(), recipe, example_inputs=X)
    split = [f for f in plan.fallbacks if "branches on self.training" in f["reason"]]
    assert [f["name"] for f in split] == ["1", "3"] and all(f["chosen"] for f in split)


def test_the_model_computes_what_it_did_in_both_modes():
    dense = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(dense, "tl1", total_steps=4, example_inputs=X)
    torch.testing.assert_close(m(X), dense(X))  # training mode: batch statistics
    m.eval()
    dense.eval()
    torch.testing.assert_close(m(X), dense(X))  # eval mode: running statistics
    final = sparsify.finalize(m)
    torch.testing.assert_close(final(X), dense(X))


def test_weight_recipes_keep_the_module_inlined():
    # nothing inserted after the activation: one graph as before (the eval call runs the model's forward)
    plan = sparsify.plan(net(), "st3", example_inputs=X)
    assert not [f for f in plan.fallbacks if "branches on self.training" in f["reason"]]


@pytest.mark.parametrize("name", ["efficientnet_b0", "rexnet_100", "efficientformerv2_s0"])
def test_timm_models_whose_activations_sit_in_batchnormact2d(name):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[dev]')")
    torch.manual_seed(0)
    # efficientformerv2: timm's own GELU class (timm.layers.activations) inside BatchNormAct2d, traced into
    # as if it were code until it was known as an activation module
    kwargs, x = ({"img_size": 64}, torch.randn(4, 3, 64, 64)) if name.startswith("efficientformer") else ({}, X)
    m = trained(timm.create_model(name, num_classes=4, **kwargs), "tl1", x)
    measured = sparsify.measure(m, [(x, Y)], max_batches=1)
    assert len(measured.nodes) >= 20 and measured.zero_fraction is not None
    m.eval()
    with torch.no_grad():
        m(x)  # the evaluation report's figure comes from
    rows = [row for row in sparsify.report(m).layers if row.sparsifies == "activations"]
    assert rows and all(row.achieved is not None for row in rows)


class _TrainBranch(nn.Module):
    """A root whose forward branches on self.training around everything (timm's RegNet under SAS)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        x = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return x * 2 if self.training else x


def test_sparsify_says_when_eval_will_skip_the_inserted_nodes():
    """The graph holds the training branch, so eval runs the model's own forward without the
    semi-structured mask: sparsify says so at once, and the plan's capture notes keep it (before,
    only the first eval call said it); a weight recipe, which inserts nothing, says nothing."""
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(_TrainBranch(), "semi-structured", total_steps=4, example_inputs=x)
    said_ = [str(w.message) for w in caught if "branches on self.training" in str(w.message)]
    assert len(said_) == 1 and said_[0].startswith("sparsify: _TrainBranch (<root>) branches on self.training")
    assert "without conv_pmask" in said_[0]
    assert [n for n in m.sparsify_state.plan.capture_notes if "branches on self.training" in n]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(_TrainBranch(), "gmp", total_steps=4, example_inputs=x)
    assert not [w for w in caught if "branches on self.training" in str(w.message)]
