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


class SameBNAct(BNAct):
    """A mode branch that computes the same in both modes (batch statistics, no update) by other
    code: a graph holding one branch would still be told apart from the other."""

    def forward(self, x):
        if self.training:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps)
        else:
            x = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return self.act(x)


def sas_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), SameBNAct(8), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("recipe", ["sas", "sas-m4"])
def test_sas_computes_the_same_in_both_modes_around_a_mode_branching_relu(recipe):
    """SAS traced into the module to reach its ReLU: the graph held the training branch, so the
    layers rewired to read the relu's input did so in training only, and every eval call (and the
    finalized model) fed them the relu's output. The module now runs as it is, the layer after it
    stays dense with the reason, and the relu outside it is rewired in both modes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(sas_net(), recipe, total_steps=4, example_inputs=X, init="identity")
    assert not [w for w in caught if "branches on self.training and its graph" in str(w.message)]
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(3):
        loss = F.cross_entropy(m(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m, loss)
    with torch.no_grad():
        train_out = m(X)
        m.eval()
        eval_out = m(X)
    torch.testing.assert_close(eval_out, train_out)
    torch.testing.assert_close(sparsify.finalize(m)(X), eval_out)
    rows = {row["name"]: row for row in sparsify.plan(sas_net(), recipe, example_inputs=X).to_dict()["entries"]}
    assert rows["4"]["method"] == "sas"
    assert rows["2"]["method"] is None and rows["2"]["reason"].startswith(
        "sas: its ReLU is inside 1 (SameBNAct), whose forward branches on self.training: SAS would run in training "
        "mode only")


@pytest.mark.parametrize("name", ["regnetx_002", "mobilenetv3_small_100"])
def test_sas_on_timm_models_whose_relus_sit_in_batchnormact2d(name):
    """Before, their graph held BatchNormAct2d's training branch: eval (and the finalized model)
    fed the layers rewired past its relu the relu's output (after training, eval CE 64 where the
    training forward had 0)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[dev]')")
    from sparsify.prepare.training_only import training_only_graphs
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model(name, num_classes=4)
    for bn in model.modules():  # RegNet zeroes each residual branch's last one: those branches would add nothing
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(bn.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # identity coefficients: a layer reading the relu's output computes something else than one rewired
        m = sparsify.sparsify(model, "sas", total_steps=4, example_inputs=x, init="identity")
        assert training_only_graphs(m) == []
        m.eval()
        with torch.no_grad():
            torch.testing.assert_close(sparsify.finalize(m)(x), m(x))
        for bn in m.modules():  # batch statistics in both modes, none updated: both compute the same function
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.momentum = 0.0
        m.train()
        with torch.no_grad():
            train_out = m(x)
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
            m.eval()
            torch.testing.assert_close(m(x), train_out)
    reasons = [e.reason for e in m.sparsify_state.plan.entries if "its ReLU is inside" in e.reason]
    assert reasons and "(BatchNormAct2d), whose forward branches on self.training" in reasons[0]


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
