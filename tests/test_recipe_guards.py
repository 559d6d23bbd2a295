"""Guards for load_recipe and the recipe checks that no other test pinned: overrides of schedule
keys, recipe files named without .json, a file recipe's default name, overrides carried over when a
Recipe is loaded again, and stages that begin together."""
from __future__ import annotations

import json

from torch import nn

import sparsify
from sparsify import load_recipe

SCHEDULED = {"version": 1, "schedule": {"begin": 0, "end": 10, "fix": 20},
             "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}


def test_an_override_of_a_schedule_key_is_written_into_the_schedule():
    """load_recipe(recipe, end=15) sets the schedule block's end, what sparsify reads from the document."""
    r = load_recipe(SCHEDULED, end=15)
    assert r.data["schedule"]["end"] == 15
    assert r.rules[0].params["end"] == 15


def test_a_schedule_key_no_rules_method_has_can_be_overridden():
    """A schedule-block key is a parameter of the recipe even when no rule's method reads it."""
    rec = {"version": 1, "schedule": {"begin": 0, "end": 10, "fix": 20},
           "rules": [{"match": {"type": "Linear"}, "method": "tl1"}]}
    r = load_recipe(rec, fix=15)
    assert r.data["schedule"]["fix"] == 15


def test_a_recipe_file_without_an_extension_in_the_working_folder_loads(tmp_path, monkeypatch):
    """A recipe file named without .json is found by its name in the current folder."""
    (tmp_path / "myprune").write_text(json.dumps(SCHEDULED))
    monkeypatch.chdir(tmp_path)
    r = load_recipe("myprune")
    assert r.rules[0].method is not None and r.data["schedule"]["end"] == 10


def test_a_recipe_file_without_a_name_is_named_after_its_stem(tmp_path):
    """A recipe file with no "name" is called by its file name, without folder or extension."""
    path = tmp_path / "prune90.json"
    path.write_text(json.dumps(SCHEDULED))
    assert load_recipe(str(path)).name == "prune90"
    assert load_recipe(path).name == "prune90"


def test_a_reloaded_recipe_keeps_the_overrides_it_was_given():
    """Loading a Recipe again with more overrides names both the earlier and the new ones."""
    assert load_recipe(load_recipe("st3", begin=1), sparsity=0.8).overrides == ("begin", "sparsity")


def test_two_stages_may_begin_at_the_same_step():
    """Stages are listed in the order they start; two starting together are in order."""
    rec = {"version": 1, "stages": [{"name": "a", "begin": 0, "end": 5}, {"name": "b", "begin": 0, "end": 8}],
           "rules": [{"match": {"type": "Linear"}, "method": "l1-prune",
                      "params": {"stage": "b", "sparsity": 0.5, "prune_at": 0.5}}]}
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), rec, total_steps=10)
    assert [e.method for e in m.sparsify_state.plan.entries if e.method] == ["l1-prune", "l1-prune"]
