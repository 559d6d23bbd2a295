"""Layer selection edges: which layers a recipe's `match` picks, and what the plan says about it."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


def recipe(*rules):
    return {"version": 1, "rules": list(rules)}


def methods(plan) -> dict:
    return {e.name: e.method for e in plan.entries}


def chain():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


X4 = torch.zeros(1, 4)


# ---------------------------------------------------------------------------------------------
# passes/select.py: depthwise, name globs
# ---------------------------------------------------------------------------------------------

def test_single_input_channel_stem_is_not_depthwise():
    """A grayscale stem Conv2d(1, 8, 3) has groups == in_channels == 1: it is not depthwise, so
    "keep depthwise convs dense" must not silently leave the stem dense too."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    rules = recipe({"match": {"type": "Conv2d"}, "method": "st3"}, {"match": {"depthwise": True}, "method": None})
    plan = sparsify.plan(model, rules, example_inputs=torch.zeros(1, 1, 12, 12))
    assert methods(plan) == {"0": "st3", "2": None, "4": "st3"}
    assert plan.unmatched_rules == []


def test_one_character_class_glob_matches_its_layer():
    """`[2]` is a character class (docs/recipes.md), not the literal text "[2]": layer `2` is
    kept dense and the rule is not reported as matching nothing."""
    rules = recipe({"match": {"type": "Linear"}, "method": "st3"}, {"match": {"name": "[2]"}, "method": None})
    plan = sparsify.plan(chain(), rules, example_inputs=X4)
    assert methods(plan) == {"0": "st3", "2": None, "4": "st3"}
    assert plan.unmatched_rules == []


# ---------------------------------------------------------------------------------------------
# ends: `last` inside a module that runs as it is
# ---------------------------------------------------------------------------------------------

class CallsABA(nn.Module):
    """Untraceable (data-dependent loop): runs as it is, calling its children a, b, a."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(int(x.shape[0])):
            x = self.a(x)
        x = self.b(x)
        return self.a(x)


def test_last_is_the_child_called_latest_in_an_untraceable_module():
    """`a` runs again after `b`, so `a` is the last layer: a "keep the last layer dense" rule must
    keep `a` dense, not `b` (ordering by each child's first call would pick `b`)."""
    rules = recipe({"match": {"type": "Linear"}, "method": "st3"}, {"match": {"last": True}, "method": None})
    plan = sparsify.plan(CallsABA(), rules, example_inputs=X4)
    assert any(c["capture"] == "module by module" for c in plan.captures)  # the premise: run as it is
    assert methods(plan) == {"a": None, "b": "st3"}


# ---------------------------------------------------------------------------------------------
# tracing: containers below an untraceable module
# ---------------------------------------------------------------------------------------------

class OpaqueHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"x": nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "y": nn.Linear(4, 4)})

    def forward(self, x):
        for _ in range(int(x.shape[0])):  # data-dependent loop: the root cannot be traced
            x = self.heads["x"](x)
        return self.heads["y"](x)


def test_layers_in_a_moduledict_under_an_untraceable_module_are_sparsified():
    """Layers held in an nn.ModuleDict below a module that runs as it is are still reached: the
    plan lists them and sparsify replaces them (not left dense without a word)."""
    plan = sparsify.plan(OpaqueHeads(), "st3", example_inputs=X4)
    assert methods(plan) == {"heads.x.0": "st3", "heads.y": "st3"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(OpaqueHeads(), "st3", total_steps=4, example_inputs=X4)
    assert type(model.heads["x"][0]).__name__ == "ST3Linear"
    assert type(model.heads["y"]).__name__ == "ST3Linear"


# ---------------------------------------------------------------------------------------------
# prepare/matching.py
# ---------------------------------------------------------------------------------------------

def test_channel_range_max_is_inclusive():
    """`out_channels: {"max": 8}` includes a layer with exactly 8 outputs (ranges are inclusive,
    docs/recipes.md): both Linear layers here stay dense."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    rules = recipe({"match": {"type": "Linear"}, "method": "st3"},
                   {"match": {"type": "Linear", "out_channels": {"max": 8}}, "method": None})
    plan = sparsify.plan(model, rules, example_inputs=torch.zeros(1, 16))
    assert methods(plan) == {"0": None, "2": None}


def test_not_name_list_excludes_every_listed_layer():
    """`not_name: ["0", "4"]` excludes both layers, not only names matching every glob at once."""
    rules = recipe({"match": {"type": "Linear", "not_name": ["0", "4"]}, "method": "st3"})
    plan = sparsify.plan(chain(), rules, example_inputs=X4)
    assert methods(plan) == {"0": None, "2": "st3", "4": None}


def test_conv1d_in_channels_is_nx():
    """transformers' Conv1D(nf, nx) takes nx inputs (weight shape (nx, nf)): an `in_channels`
    rule must compare nx, not the output width nf."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils", reason="transformers is not installed "
                                 "(pip install fx-sparsify[integrations])").Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(nf=96, nx=32)
            self.out = nn.Linear(96, 2)

        def forward(self, x):
            return self.out(self.proj(x))

    assert M().proj.weight.shape == (32, 96)
    rules = recipe({"match": {"type": "Linear", "in_channels": {"min": 32, "max": 32}}, "method": "st3"})
    plan = sparsify.plan(M(), rules, example_inputs=torch.zeros(1, 32))
    assert methods(plan) == {"proj": "st3", "out": None}
    assert plan.unmatched_rules == []


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu_(self.a(x)))


def test_op_rule_matches_inplace_functional_activation():
    """An `op: "relu"` rule matches `torch.relu_(x)` (docs/recipes.md: `relu` matches `x.relu_()`):
    activation recipes must not skip in-place functional activations."""
    rules = recipe({"match": {"op": "relu"}, "method": "activation-l1"})
    plan = sparsify.plan(InplaceRelu(), rules, example_inputs=X4)
    hits = [(e.kind, e.method) for e in plan.entries if e.method]
    assert hits == [("relu", "activation-l1")]
    assert plan.unmatched_rules == []
    built_in = sparsify.plan(InplaceRelu(), "activation-l1", example_inputs=X4)
    assert [e.method for e in built_in.entries if e.method] == ["activation-l1"]


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.fc(torch.relu(h)) + self.fc(h))  # fc called twice, once not after a relu


def test_layer_declined_by_its_own_rule_is_not_reported_shadowed():
    """A layer SAS leaves dense (called twice, one call not after a relu) is declined by the rule
    that matched it; it is not "shadowed" by that same rule as an earlier one."""
    rules = recipe({"match": {"type": "Linear"}, "method": "sas"})
    plan = sparsify.plan(TwiceCalled(), rules, example_inputs=X4)
    assert "fc" in {e.name for e in plan.dense}  # the premise: fc stays dense
    assert plan.shadowed == []
    said = plan.warnings(sparsify.load_recipe(rules))
    assert not [w for w in said if "declines" in w and "would rewrite" in w], said


def test_exception_split_by_later_rules_is_not_overruled():
    """Rule 1 keeps `0` and `2` dense; rules 2 and 3 each take back one of them. No single later
    rule covers rule 1, and the earlier broad rule 0 does not count: nothing is overruled."""
    rules = recipe({"match": {"type": "Linear"}, "method": "st3"},
                   {"match": {"name": ["0", "2"]}, "method": None},
                   {"match": {"name": "0"}, "method": "st3", "params": {"sparsity": 0.5}},
                   {"match": {"name": "2"}, "method": "st3", "params": {"sparsity": 0.6}})
    plan = sparsify.plan(chain(), rules, example_inputs=X4)
    assert plan.overruled_rules == []
    assert not [w for w in plan.warnings(sparsify.load_recipe(rules)) if "later rules win" in w]


def test_a_null_rule_before_a_declining_rule_is_not_an_earlier_method():
    """`"method": null` for `4`, then N:M on every Linear, which declines `4` (3 inputs make no groups
    of 4): the null rule has no method that would have rewritten `4`, so nothing is reported shadowed
    and `4` stays dense with N:M's reason."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))
    rules = recipe({"match": {"name": "4"}, "method": None}, {"match": {"type": "Linear"}, "method": "nm"})
    plan = sparsify.plan(model, rules, example_inputs=X4)
    assert methods(plan) == {"0": "nm", "2": "nm", "4": None}
    assert plan.shadowed == []
    assert "multiple of 4" in next(e.reason for e in plan.entries if e.name == "4")


def test_a_declined_layer_names_the_last_earlier_rule_that_would_take_it():
    """st3 then magnitude on every Linear, then N:M, which declines `4` (3 inputs): later rules win,
    so `4` stays dense, and the plan names magnitude's rule 1, the last that would have rewritten it."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))
    rules = recipe({"match": {"type": "Linear"}, "method": "st3"}, {"match": {"type": "Linear"}, "method": "magnitude"},
                   {"match": {"type": "Linear"}, "method": "nm"})
    plan = sparsify.plan(model, rules, example_inputs=X4)
    assert [(s["name"], s["rule"], s["earlier"]) for s in plan.shadowed] == [("4", 2, 1)]
