"""Recipe surface: rule order, malformed fields, names, files, read-only results, schedule times."""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify import RecipeError, ScheduleError


def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


X = torch.zeros(1, 3, 6, 6)
BROAD = {"match": {"type": ["Conv2d", "Linear"]}, "method": "st3"}


def recipe(*rules):
    return {"version": 1, "rules": list(rules)}


def sparsify_warnings(rules) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sparsify.sparsify(net(), rules, total_steps=4, example_inputs=X)
    return model, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# a rule a later rule overrules everywhere
# ---------------------------------------------------------------------------------------------

def test_exclusion_before_the_broad_rule_is_warned_and_planned():
    rules = recipe({"match": {"name": "3"}, "method": None}, BROAD)  # keep the classifier dense... too early
    model, said = sparsify_warnings(rules)
    assert type(model[3]).__name__ == "ST3Linear"  # later rules win: documented, but no longer silent
    lines = [m for m in said if "decides nothing" in m]
    assert len(lines) == 1, said
    assert "rule 0 (null: dense) decides nothing" in lines[0] and "rule 1 (st3)" in lines[0]
    assert "later rules win" in lines[0] and "put an exception after the broad rule" in lines[0]
    assert "(first: 3)" in lines[0]

    plan = sparsify.plan(net(), rules, total_steps=4, example_inputs=X)
    assert plan.overruled_rules == [{"rule": 0, "later": 1, "sites": 1, "first": "3", "broader": True}]
    assert json.loads(plan.to_json())["overruled_rules"] == plan.overruled_rules
    assert "warning: rule 0 decides nothing" in str(plan) and "matched by rule 1 too" in str(plan)


def test_exceptions_after_rules_that_match_only_them_get_no_reorder_advice():
    """Broad rules first, exceptions after (the recommended shape), where on this model an exception
    matches exactly the layers of an earlier rule (the only Conv2d is the first layer): the warning
    says the later rule decides them, not to move an exception that already comes after."""
    rules = recipe({"match": {"type": "Conv2d"}, "method": "st3"},
                   {"match": {"type": "Linear"}, "method": "st3", "params": {"sparsity": 0.5}},
                   {"match": {"first": True}, "method": None}, {"match": {"last": True}, "method": None})
    _, said = sparsify_warnings(rules)
    lines = [m for m in said if "decides nothing" in m]
    assert len(lines) == 2, said
    assert "rule 0 (st3) decides nothing: on this model every layer it matches (1, first: 0) is decided by " \
        "rule 2 (null: dense)" in lines[0], lines
    assert "rule 1 (st3) decides nothing" in lines[1] and "rule 3 (null: dense)" in lines[1], lines
    assert not [m for m in lines if "exception" in m or "broad rule" in m], lines
    plan = sparsify.plan(net(), rules, total_steps=4, example_inputs=X)
    assert [o["broader"] for o in plan.overruled_rules] == [False, False]
    assert "warning: rule 0 decides nothing: on this model every layer it matches" in str(plan)


def test_a_rule_given_twice_is_warned():
    _, said = sparsify_warnings(recipe(BROAD, BROAD))
    assert any("rule 0 (st3) decides nothing" in m and "rule 1 (st3)" in m for m in said), said


def test_two_methods_on_the_same_layers_are_said_not_to_combine():
    """A weight method and then another method on the same layers: the later one alone applies; the
    warning says a layer takes one method, not to add an exception."""
    later = dict(BROAD, method="magnitude")
    _, said = sparsify_warnings(recipe(BROAD, later))
    lines = [m for m in said if "decides nothing" in m]
    assert len(lines) == 1 and "a layer takes one method, so two methods on the same layers do not combine" \
        in lines[0] and "exception" not in lines[0], said


def test_exceptions_after_the_broad_rule_are_not_warned():
    # the usual shape: broad first, then narrower exceptions, which here override it everywhere
    rules = recipe(BROAD, {"match": {"name": "0"}, "method": None},
                   {"match": {"name": "3"}, "method": "st3", "params": {"sparsity": 0.5}})
    _, said = sparsify_warnings(rules)
    assert not [m for m in said if "decides nothing" in m], said
    assert sparsify.plan(net(), rules, total_steps=4).overruled_rules == []
    _, said = sparsify_warnings(recipe({"match": {"name": "3"}, "method": None, "optional": True}, BROAD))
    assert not [m for m in said if "decides nothing" in m], said  # optional: not warned, as for "matched nothing"


# ---------------------------------------------------------------------------------------------
# malformed fields, names and files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [["st3"], {"name": "st3"}, 3])
def test_a_method_that_is_not_a_name_is_a_recipe_error(method, tmp_path):
    bad = recipe({"match": {"type": "Linear"}, "method": method})
    want = re.escape(f"<dict>: $.rules[0].method: must be a method name (a string) or null, "
                     f"got {type(method).__name__}")
    with pytest.raises(RecipeError, match=want):
        sparsify.load_recipe(bad)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RecipeError, match=re.escape(f"{path}: $.rules[0].method: must be a method name")):
        sparsify.load_recipe(path)


@pytest.mark.parametrize("name, meant", [("SAS", "sas"), ("ST3", "st3"), ("st-3", "st3")])
def test_a_near_miss_builtin_name_says_did_you_mean(name, meant):
    with pytest.raises(RecipeError, match=re.escape(f"unknown recipe {name!r} (did you mean {meant!r}?); built-in")):
        sparsify.load_recipe(name)
    with pytest.raises(RecipeError, match=re.escape(f"unknown method {name!r} (did you mean {meant!r}?)")):
        sparsify.load_recipe(recipe({"match": {"type": "Linear"}, "method": name}))


def test_a_recipe_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recipe({"match": {"type": "Linear"}, "method": "st3"})).encode())
    assert sparsify.load_recipe(path).rules[0].method == "st3"


@pytest.mark.parametrize("key", ["in_channels", "out_channels"])
def test_an_empty_channel_range_is_refused(key):
    with pytest.raises(RecipeError, match=re.escape(f"<dict>: invalid recipe: $.rules[0].match.{key}: empty range: "
                                                    "min 10 is above max 3")):
        sparsify.load_recipe(recipe({"match": {"type": "Conv2d", key: {"min": 10, "max": 3}}, "method": "st3"}))
    sparsify.load_recipe(recipe({"match": {"type": "Conv2d", key: {"min": 3, "max": 3}}, "method": "st3"}))


# ---------------------------------------------------------------------------------------------
# a loaded recipe is read-only (sparsify builds from its JSON)
# ---------------------------------------------------------------------------------------------

def test_a_loaded_recipes_rules_cannot_be_edited_silently():
    r = sparsify.load_recipe("st3")
    for edit in (lambda: r.rules[0].params.__setitem__("sparsity", 0.1), lambda: r.rules[0].params.update(sparsity=0.1),
                 lambda: r.rules[0].match["type"].append("Embedding"), lambda: r.rules[0].match.pop("type")):
        with pytest.raises(TypeError, match="read-only .* override"):
            edit()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.rules[0].params = {"sparsity": 0.1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "mine"
    assert r.rules[0].params["sparsity"] == 0.9 and r.data["rules"][0]["params"]["sparsity"] == 0.9
    # copies stay read-only (a copied Recipe builds from its data too); dict() gives an editable one
    for c in (copy.deepcopy(r), pickle.loads(pickle.dumps(r)), copy.copy(r)):
        assert c == r and c.rules[0].match["type"] == list(r.rules[0].match["type"])
        with pytest.raises(TypeError, match="read-only"):
            c.rules[0].match["type"].append("Embedding")
        with pytest.raises(TypeError, match="read-only"):
            c.rules[0].params["sparsity"] = 0.1
    editable = dict(r.rules[0].params)
    editable["sparsity"] = 0.1
    assert json.loads(json.dumps(r.rules[0].params)) == r.rules[0].params
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), r, total_steps=4, sparsity=0.5)
    assert m.sparsify_state.recipe["rules"][0]["params"]["sparsity"] == 0.5


def test_a_loaded_recipes_data_cannot_be_edited_in_place():
    """recipe.data was a plain dict: an edit of it changed what sparsify() built while recipe.rules
    still said the loaded value. It refuses edits as the rules do; a copy of it is editable."""
    r = sparsify.load_recipe("st3", sparsity=0.8)
    for edit in (lambda: r.data["rules"][0]["params"].__setitem__("sparsity", 0.3),
                 lambda: r.data.__setitem__("name", "x"), lambda: r.data["rules"].append({}),
                 lambda: r.data["rules"][0]["match"]["type"].append("Embedding")):
        with pytest.raises(TypeError, match="read-only .* override"):
            edit()
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), r, total_steps=4)
    assert m.sparsify_state.recipe["rules"][0]["params"]["sparsity"] == 0.8 == r.rules[0].params["sparsity"]
    assert json.loads(json.dumps(r.data)) == json.loads(r.to_json()) and dict(r.data)["name"] == "st3"
    mine = copy.deepcopy(r.data)  # what the error says to edit (json.loads(r.to_json()) is one too)
    mine["rules"][0]["params"]["sparsity"] = 0.3
    assert json.loads(r.to_json()) == mine | {"rules": r.data["rules"]}
    top = dict(r.data)
    top["name"] = "mine"
    assert sparsify.load_recipe(mine).rules[0].params["sparsity"] == 0.3 and sparsify.load_recipe(top).name == "mine"
    for c in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        with pytest.raises(TypeError, match="read-only"):
            c.data["rules"][0]["params"]["sparsity"] = 0.3
        assert sparsify.load_recipe(c, sparsity=0.5).rules[0].params["sparsity"] == 0.5


# ---------------------------------------------------------------------------------------------
# schedule times
# ---------------------------------------------------------------------------------------------

def test_a_time_of_one_point_zero_is_refused_not_step_one():
    want = re.escape("$.rules[0].params.end=1.0 would be step 1, not the whole run")
    with pytest.raises(ScheduleError, match=want) as e:
        sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), "st3", total_steps=100, begin=0, end=1.0)
    assert "end=N with total_steps=N" in str(e.value) and "\n" not in str(e.value)
    sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), "st3", total_steps=100, begin=0, end=1, fix=None)  # step 1


def test_a_non_whole_step_count_is_refused_not_truncated():
    with pytest.raises(ScheduleError, match=re.escape("$.rules[0].params.end=1.5 is neither a step count (a whole "
                                                      "number) nor a fraction of the run")):
        sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), "st3", total_steps=100, begin=0, end=1.5)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), "st3", total_steps=100, begin=0, end=50.0, fix=None)
    assert m is not None  # a whole float above 1 is still a step count


def test_a_bad_time_is_a_recipe_error_that_starts_with_the_recipe_s_source(tmp_path):
    """docs/recipes.md: recipe errors raise RecipeError and start with the source; the times' errors
    were plain ValueErrors starting at the JSON path."""
    path = tmp_path / "end1.json"
    path.write_text(json.dumps(recipe({"match": {"type": "Linear"}, "method": "st3", "params": {"end": 1.0}})))
    with pytest.raises(RecipeError, match=re.escape(f"{path}: $.rules[0].params.end=1.0 would be step 1")) as e:
        sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), str(path), total_steps=10)
    assert isinstance(e.value, ScheduleError) and str(e.value).startswith(f"{path}: ")
    with pytest.raises(RecipeError, match=r"^built-in:st3: \$\.rules\[0\]\.params\.begin=0\.05 is a fraction"):
        sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "st3")  # found by sparsify(), not load_recipe
    stages = recipe({"match": {"type": "Linear"}, "method": "l1-prune", "params": {"stage": "w"}})
    stages["stages"] = [{"name": "w", "begin": 1.5, "end": None}]
    with pytest.raises(RecipeError, match=re.escape("<dict>: $.stages[0].begin=1.5 is neither a step count")):
        sparsify.load_recipe(stages)


def test_load_recipe_refuses_stages_out_of_order_itself():
    """It was said only by sparsify(): a recipe file checked with load_recipe (or `sparsify recipes
    --show`) passed with its stages out of order."""
    rule = {"match": {"type": "Conv2d"}, "method": "l1-prune", "params": {"stage": "w"}}
    unordered = [{"name": "w", "begin": 0.5, "end": None}, {"name": "v", "begin": 0.1, "end": 0.5}]
    with pytest.raises(RecipeError, match=re.escape("$.stages[1].begin: stages are listed in the order")):
        sparsify.load_recipe({"version": 1, "stages": unordered, "rules": [rule]})
    sparsify.load_recipe({"version": 1, "stages": unordered[::-1], "rules": [rule]})


def test_a_weight_method_on_modules_it_does_not_take_says_why_it_matched_nothing():
    """``{"type": "ReLU"}`` with st3: the rule matches only the layers st3 rewrites, so nothing; the
    warning said so with no reason."""
    r = recipe({"match": {"type": "ReLU"}, "method": "st3"})
    _, said = sparsify_warnings(r)
    lines = [m for m in said if "matched nothing" in m]
    assert len(lines) == 1 and "matched nothing ({'type': 'ReLU'}) (it matched 1 module st3 does not take, " \
        "ReLU: st3 applies to Conv1d, Conv2d" in lines[0], said
    assert "(it matched 1 module st3 does not take, ReLU" in str(sparsify.plan(net(), r, total_steps=4))


@pytest.mark.parametrize("given", ["torch.nn.Conv2d", "nn.Conv2d", "conv2d"])
def test_a_qualified_type_name_says_did_you_mean(given):
    rules = recipe({"match": {"type": given}, "method": "st3"}, {"match": {"type": "Linear"}, "method": "st3"})
    _, said = sparsify_warnings(rules)
    assert any(f"matched nothing ({{'type': '{given}'}}) (did you mean 'Conv2d'?)" in m for m in said), said


def test_a_name_matching_a_block_says_how_to_match_its_layers():
    """``{"name": "layer1"}`` names a block, which holds layers but is none: the warning says 'layer1.**'."""
    model = nn.Sequential()
    model.add_module("layer1", net())
    r = {"version": 1, "name": "mine", "schedule": {"begin": 0, "end": 0},
         "rules": [{"match": {"name": ["layer1", "nothing"]}, "method": "magnitude", "params": {"sparsity": 0.5}}]}
    with pytest.warns(UserWarning) as record:
        sparsify.sparsify(model, r, example_inputs=X)
    assert any("matched nothing ({'name': ['layer1', 'nothing']}) ('layer1' matches the block layer1, not a layer: "
               "'layer1.**' matches what it holds); see" in str(w.message) for w in record)
    assert "matched nothing ('layer1' matches the block" in str(sparsify.plan(model, r, example_inputs=X))


def test_a_name_matching_a_layer_is_not_called_a_block():
    """``{"name": "1"}`` with st3 names the ReLU, a layer holding nothing: the warning gives st3's
    reason, not the block hint ('1.**' would match nothing either)."""
    _, said = sparsify_warnings(recipe({"match": {"name": "1"}, "method": "st3"}))
    lines = [m for m in said if "matched nothing" in m]
    assert len(lines) == 1 and "(it matched 1 module st3 does not take, ReLU" in lines[0], said
    assert "matches the block" not in lines[0]
