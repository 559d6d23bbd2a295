"""``load_state_dict`` on a sparsified model: a checkpoint of another ``sparsify(...)`` call is
refused before any of it is loaded, and terms recorded for a penalty not yet collected are dropped.

The check sat in the state's ``set_extra_state``, which runs after every layer loaded: an st3
checkpoint at 90% refused by a model sparsified at 50% had already overwritten 36 of its 44
entries (weights, masks, thresholds, the step: 4), so a caller who caught the error and trained
on ("resume if possible, else start fresh") trained another run's model. And the message printed
only ``total_steps``, which read "checkpoint total_steps=10, model total_steps=10" when the recipe
differed."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import sparsify
from loops import run_steps

X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.arange(8)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))


def trained(recipe, total_steps=10, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(net(), recipe, total_steps=total_steps, example_inputs=X, **overrides)
        run_steps(m, torch.optim.SGD(m.parameters(), lr=0.01), [(X, Y)] * 4, penalty=True)
    return m


@pytest.mark.parametrize("theirs, ours, named", [
    (("st3", 10, {}), ("st3", 10, {"sparsity": 0.5}), "rules[0].params.sparsity: 0.9 in the checkpoint, 0.5 here"),
    (("st3", 10, {}), ("st3", 20, {}), "total_steps: 10 in the checkpoint, 20 here"),
    (("st3", 10, {}), ("gmp", 10, {}), 'recipe "st3" in the checkpoint, "gmp" here'),
    (("tl1", 10, {}), ("tl1", 10, {"lam": 1.0}), "rules[0].params.lam: 0.1 in the checkpoint, 1.0 here"),
    (("sas", 10, {}), ("sas", 10, {"m": 4}), "rules[0].params.m: 2 in the checkpoint, 4 here"),
])
def test_nothing_is_loaded_and_the_difference_is_named(theirs, ours, named):
    checkpoint = trained(theirs[0], theirs[1], **theirs[2]).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(net(), ours[0], total_steps=ours[1], example_inputs=X, **ours[2])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="another sparsify") as caught:
        model.load_state_dict(checkpoint)
    assert named in str(caught.value) and "nothing was loaded" in str(caught.value)
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_display_only_recipe_fields_do_not_refuse_a_checkpoint(tmp_path):
    """A rule's comment, the recipe's name (a file's stem when it has none), its description and a
    stage's description change nothing a run computes: a checkpoint whose recipe differs only in
    them loads. Any other difference is still refused, named with both recipes' names."""
    def build(name, data):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sparsify.sparsify(net(), str(path), total_steps=10, example_inputs=X)

    def data(comment, description, sparsity=0.5, **top):
        return {"version": 1, **top, "description": description,
                "stages": [{"name": "w", "begin": 0, "end": None, "description": description}],
                "rules": [{"match": {"type": "Linear"}, "method": "st3", "params": {"sparsity": sparsity},
                           "comment": comment}]}
    saved = build("v1", data("v1", "first try", name="mine"))
    run_steps(saved, torch.optim.SGD(saved.parameters(), lr=0.01), [(X, Y)] * 3)
    for name, other in [("v2", data("v2", "second try", name="mine")), ("v3", data("v2", "second try", name="yours")),
                        ("v4", data("v1", "first try"))]:  # a file's stem as its name: "v4"
        model = build(name, other)
        model.load_state_dict(saved.state_dict())
        assert int(model.sparsify_state.step) == 3 and torch.equal(model[3].mask, saved[3].mask), name
    model = build("v5", data("v1", "first try", sparsity=0.6, name="yours"))
    with pytest.raises(RuntimeError, match='recipe "mine" in the checkpoint, "yours" here'):
        model.load_state_dict(saved.state_dict())
    model = build("v6", data("v2", "first try", sparsity=0.6, name="mine"))
    with pytest.raises(RuntimeError, match=r"\(rules\[0\]\.params\.sparsity: 0\.5 in the checkpoint, 0\.6 here\)"):
        model.load_state_dict(saved.state_dict())


def test_inside_a_wrapper_module_the_prefix_is_followed():
    class Wrapper(nn.Module):  # a LightningModule holding the sparsified net as an attribute
        def __init__(self, inner):
            super().__init__()
            self.net = inner
    checkpoint = Wrapper(trained("gmp")).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Wrapper(sparsify.sparsify(net(), "gmp", total_steps=12, example_inputs=X))
    with pytest.raises(RuntimeError, match="total_steps: 10 in the checkpoint, 12 here"):
        model.load_state_dict(checkpoint)
    assert int(model.net.sparsify_state.step) == 0


def test_the_same_call_loads_and_a_dense_checkpoint_still_passes_the_hook():
    m = trained("st3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = sparsify.sparsify(net(), "st3", total_steps=10, example_inputs=X)
    fresh.load_state_dict(m.state_dict())
    assert int(fresh.sparsify_state.step) == 4
    fresh.load_state_dict(net().state_dict(), strict=False)  # dense weights: after_load's business
    final = sparsify.finalize(m)
    assert not final._load_state_dict_pre_hooks  # the deployed model carries no sparsify hook


@pytest.mark.parametrize("recipe", ["tl1", "activation-l1", "dual"])
def test_a_rollback_after_a_stray_training_forward_trains_on(recipe):
    # early stopping: a training-mode forward for a metric (its terms never collected), then the best
    # checkpoint back: the next penalty summed the stale terms, whose graph holds the weights as they were,
    # and backward failed inside autograd ("modified by an inplace operation ... is at version 6")
    m = trained(recipe)
    best = copy.deepcopy(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    run_steps(m, opt, [(X, Y)] * 2, penalty=True)
    m(X)  # recorded, never collected
    m.load_state_dict(best)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = run_steps(m, opt, [(X, Y)] * 2, penalty=True)
    fresh = trained(recipe)  # the same four steps, then the same two from the same weights
    fresh.load_state_dict(best)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run_steps(fresh, torch.optim.SGD(fresh.parameters(), lr=0.01), [(X, Y)] * 2, penalty=True)
    assert losses == pytest.approx(again, rel=1e-6)


def test_a_checkpoint_without_its_recipe_record_is_said_as_such_not_as_a_dense_one():
    """Dropping ``sparsify_state._extra_state`` (the record the refusal checks) to load a run into a
    model built for more steps: the warning says the saved step, masks and thresholds were loaded
    unchecked; it said "a checkpoint without sparsify state ... masks and thresholds stay those
    computed from its earlier weights", untrue for the masks it had just loaded."""
    saved = trained("gmp", total_steps=10)
    entries = {k: v for k, v in saved.state_dict().items() if k != "sparsify_state._extra_state"}
    longer = sparsify.sparsify(net(), "gmp", total_steps=20, example_inputs=X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = longer.load_state_dict(entries, strict=False)
    said = [str(w.message) for w in caught]
    assert [s for s in said if "sparsify_state._extra_state was loaded" in s] == [
        "sparsify: a sparsified checkpoint without sparsify_state._extra_state was loaded: its step (4), masks and "
        "thresholds were not checked against this model's recipe and total_steps (20 here) and go on under them; "
        "schedule times given as fractions now fall on other steps than in the saved run"]
    assert not [s for s in said if "without sparsify state" in s]
    assert result.missing_keys == ["sparsify_state._extra_state (the checkpoint's sparsify state was loaded "
                                   "without this record of its recipe)"]
    assert int(longer.sparsify_state.step) == 4
    for (k, v), w in zip(saved.state_dict().items(), longer.state_dict().values()):
        if k != "sparsify_state._extra_state":
            assert torch.equal(v, w), k


def _saved(recipe: dict, total_steps=10):
    from sparsify.core.extra_state import pack
    return pack({"recipe": json.dumps(recipe), "total_steps": total_steps})


def test_run_difference_names_what_a_python_comparison_misses():
    """1 and 1.0 are equal in Python but not to a method (a count, a fraction): a checkpoint of the
    other is refused; a rule added is named at the rules; past three differences the rest are counted."""
    from sparsify.core.load_check import run_difference
    rule = {"match": {"type": "Linear"}, "method": "nm", "params": {"n": 2}}
    ours = json.dumps({"name": "r", "rules": [rule]})
    assert run_difference(_saved({"name": "r", "rules": [rule]}), ours, 10) is None
    as_float = {**rule, "params": {"n": 2.0}}
    assert run_difference(_saved({"name": "r", "rules": [as_float]}), ours, 10) is not None
    two = run_difference(_saved({"name": "r", "rules": [rule, rule]}), ours, 10)
    assert two.startswith("rules: [") and two.endswith(" here")
    many = {"name": "r", "schedule": {"begin": 1}, "options": {"frozen": "include"}, "version": 2, "rules": [rule]}
    said = run_difference(_saved(many), ours, 20)
    assert said.startswith("total_steps: 10 in the checkpoint, 20 here; ") and said.endswith("; and 1 more"), said


def test_moved_keys_renames_only_an_entry_it_can_place_once():
    """``moved_keys`` maps a checkpoint key to the one model key it stands for: not a key the model
    has itself, not onto a key the checkpoint holds already, not one of two candidates."""
    from sparsify.core.load_check import moved_keys
    assert moved_keys(["f.0_m.mask"], ["f_0_m.mask"]) == {"f.0_m.mask": "f_0_m.mask"}
    assert moved_keys(["f.0_m.mask"], ["f_0_m.mask", "f_0.m.mask"]) == {}  # two candidates
    assert moved_keys(["f_0_m.mask"], ["f_0_m.mask", "f.0_m_mask"]) == {}  # the model's own key
    assert moved_keys(["f_0_m.mask", "f.0_m.mask"], ["f_0_m.mask"]) == {}  # its key is in the checkpoint
