"""User-visible edges: tied weights refused clearly, plan warnings and shares, recipe messages,
the dead-rows message, and the graph helpers' names and deletions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify
from passes import insert_after, remove_node, unique_name
from sparsify.core.dead_outputs import dead_outputs_message


def recipe(*rules):
    return {"version": 1, "rules": list(rules)}


LINEAR_NM = recipe({"match": {"type": "Linear"}, "method": "nm"})


def plan_warnings(model, rules, x, match):
    p = sparsify.plan(model, rules, example_inputs=x)
    return [w for w in p.warnings(sparsify.load_recipe(rules)) if match in w]


# ---------------------------------------------------------------------------------------------
# sparsify/core/tied.py: weights a rewritten layer shares that cannot follow its mask
# ---------------------------------------------------------------------------------------------

class SparseEmbeddingLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8, sparse=True)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def test_sparse_embedding_tied_to_a_sparsified_head_is_refused():
    """An Embedding(sparse=True) sharing the head's weight needs a leaf weight for its sparse
    gradient: accepting it silently turned the embedding's gradient dense."""
    x = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match=r"head's weight is tied to emb\.weight .*sparse=True"):
        sparsify.sparsify(SparseEmbeddingLM(), "st3", example_inputs=x, total_steps=10)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclass_with_its_own_forward_sharing_a_weight_is_refused_clearly():
    """A Linear subclass with its own forward reading a sparsified Linear's weight cannot be
    pointed at the effective weight: the user gets a ValueError naming it, not a KeyError."""
    a, b = nn.Linear(4, 4), ScaledLinear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.raises(ValueError, match=r"tied to .*ScaledLinear reads the weight in its own forward"):
        sparsify.sparsify(model, "st3", example_inputs=torch.randn(1, 4), total_steps=10)


# ---------------------------------------------------------------------------------------------
# sparsify/prepare/plan.py: warnings and shares
# ---------------------------------------------------------------------------------------------

def test_declined_layers_holding_exactly_ten_percent_are_warned():
    """docs/index.md: layers a method declines that hold 10% of the weights or more are warned;
    at exactly 10% (N:M declines Linear(30, 4): 120 of 1200 weights) the warning went missing."""
    model = nn.Sequential(nn.Linear(36, 30, bias=False), nn.ReLU(), nn.Linear(30, 4, bias=False))
    got = plan_warnings(model, LINEAR_NM, torch.randn(1, 36), "declined by their method")
    assert len(got) == 1 and "10% of the model's weight parameters (first: 2:" in got[0], got


def test_rewrote_nothing_names_the_first_reason_not_already_said():
    """With a frozen first layer (warned on its own line), "rewrote nothing" must cite the layer
    N:M declined and why, not repeat "frozen" and hide the cause the user can act on."""
    model = nn.Sequential(nn.Linear(36, 30), nn.ReLU(), nn.Linear(30, 4))
    model[0].requires_grad_(False)
    got = plan_warnings(model, LINEAR_NM, torch.randn(1, 36), "rewrote nothing")
    assert len(got) == 1 and "(first: 2: N:M groups run along the input channels" in got[0], got


class CalledTwice(nn.Module):
    """``fc`` is called twice: the plan lists it once per call, its 16 weights are one set."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(self.fc(h) + self.fc(torch.relu(-h)))


def test_plan_counts_a_layer_called_twice_once():
    """A layer called twice has two plan entries but one weight: its weights counted twice made
    the plan claim 57% of 56 weights rewritten (and 43% declined) for 16 of 40 (and 24 of 40)."""
    rules = recipe({"match": {"type": "Linear"}, "method": "sas"})
    p = sparsify.plan(CalledTwice(), rules, example_inputs=torch.randn(1, 4), total_steps=10)
    assert [(e.name, e.method, e.params) for e in p.entries] == [
        ("stem", None, 16), ("fc", "sas", 16), ("fc", "sas", 16), ("head", None, 8)]  # one entry per call
    shares = p.shares()
    assert shares["param_share"] == pytest.approx(16 / 40)
    assert shares["mac_share"] == pytest.approx(32 / (16 + 32 + 8))  # fc's MACs: both calls, once
    assert "1 sites rewritten, 2 weight layers left dense; rewritten layers hold 40.0% of the weight" in str(p)
    declined = [w for w in p.warnings(sparsify.load_recipe(rules)) if "declined by their method" in w]
    assert len(declined) == 1 and "2 layer(s)" in declined[0] and "60% of the model's weight" in declined[0]
    assert p.to_dict()["param_share"] == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------
# sparsify/prepare/recipe.py: overrides and null-method rules
# ---------------------------------------------------------------------------------------------

def test_misspelt_override_suggests_the_parameter():
    """``load_recipe("st3", sparse=0.8)`` must point at ``sparsity``, not just list parameters."""
    with pytest.raises(sparsify.RecipeError, match=r"override 'sparse' .*did you mean sparsity\?"):
        sparsify.load_recipe("st3", sparse=0.8)


def test_null_method_rule_with_empty_params_loads():
    """Editors and generated recipes write ``"params": {}`` on a ``"method": null`` rule: an empty
    params object takes nothing, so the recipe must load."""
    r = recipe({"match": {"type": "Linear"}, "method": "st3"},
               {"match": {"last": True}, "method": None, "params": {}})
    loaded = sparsify.load_recipe(r)
    assert [rule.method for rule in loaded.rules] == ["st3", None]


# ---------------------------------------------------------------------------------------------
# sparsify/core/dead_outputs.py
# ---------------------------------------------------------------------------------------------

def test_exactly_eight_dead_rows_are_listed_without_an_ellipsis():
    """Up to 8 dead rows are listed in full: an ellipsis after all 8 suggests rows left out."""
    msg = dead_outputs_message("sparsify.finalize", [("fc", list(range(8)), 10)])
    assert "(rows 0, 1, 2, 3, 4, 5, 6, 7)" in msg and "..." not in msg.split("(rows ")[1].split(")")[0], msg
    longer = dead_outputs_message("sparsify.finalize", [("fc", list(range(9)), 10)])
    assert "(rows 0, 1, 2, 3, 4, 5, 6, 7 ...)" in longer, longer


# ---------------------------------------------------------------------------------------------
# passes/rewrite.py
# ---------------------------------------------------------------------------------------------

def test_unique_name_skips_every_taken_suffix():
    """With probe, probe_1 and probe_2 taken, a new probe is probe_3: reusing probe_2 silently
    replaced the module already installed there."""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    relu = list(gm.graph.nodes)[1]
    for mod in (nn.Identity(), nn.Tanh(), nn.GELU()):
        insert_after(gm, relu, mod, "probe")
    assert unique_name(gm, "probe") == "probe_3"
    insert_after(gm, relu, nn.Sigmoid(), "probe")
    assert [(n, type(c).__name__) for n, c in gm.named_children()] == [
        ("0", "ReLU"), ("probe", "Identity"), ("probe_1", "Tanh"), ("probe_2", "GELU"), ("probe_3", "Sigmoid")]


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.act(x))


def test_remove_node_keeps_a_module_another_node_still_calls():
    """Removing one of two calls with delete_module=True must keep the module the other call
    runs: deleting it left a graph that fails with AttributeError."""
    gm = torch.fx.symbolic_trace(Twice())
    remove_node(gm, [n for n in gm.graph.nodes if n.op == "call_module"][0], delete_module=True)
    gm.recompile()
    assert isinstance(gm.act, nn.Tanh)
    x = torch.linspace(-1, 1, 5)
    torch.testing.assert_close(gm(x), torch.tanh(x))


def test_remove_node_deletes_a_module_nothing_calls_any_more():
    """The counterpart: the last call removed with delete_module=True takes its module along."""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Tanh(), nn.ReLU()))
    remove_node(gm, [n for n in gm.graph.nodes if n.op == "call_module"][0], delete_module=True)
    gm.recompile()
    assert not hasattr(gm, "0") and hasattr(gm, "1")
