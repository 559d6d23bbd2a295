"""Recipe times that do not fit the run are said at sparsify(): st3 / gmp with begin=100 trained
40 steps dense (said only at finalize), a fix after the run never froze the masks and tl1 with
begin=100 (or begin == end) never added a penalty, all without a word."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.prepare.recipe import builtin_recipes


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def said(recipe, total_steps, **overrides) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(net(), recipe, total_steps=total_steps, example_inputs=torch.zeros(1, 3, 8, 8), **overrides)
    return [str(w.message) for w in caught if "total_steps=" in str(w.message) or "active range" in str(w.message)]


@pytest.mark.parametrize("recipe,overrides,expected", [
    ("st3", dict(begin=100, end=200, fix=None), "begin is step 100, at or after the run's total_steps=40: the method never acts"),
    ("gmp", dict(begin=100, end=200), "never acts"),
    ("tl1", dict(begin=100), "never acts"),
    ("activation-l1", dict(begin=0.99), "begin is step 40, at or after"),
    # pruning methods act in the update of the run's last step: not "never" but with no training after
    ("gmp", dict(begin=40, end=40), "begin is step 40, the run's last step (total_steps=40): the method acts only "
                                    "after the last optimizer step, so the model is made sparse with no training"),
    ("nm-2-4", dict(begin=40, fix=None), "a one-shot prune"),
    ("st3", dict(begin=0, end=100, fix=None), "end is step 100, after the run's total_steps=40: the ramp never reaches"),
    ("semi-structured", dict(end=50), "the ramp never reaches"),
    ("st3", dict(begin=0, end=10, fix=100), "fix is step 100, after the run's total_steps=40: the masks never freeze"),
    ("nm-2-4", dict(fix=100), "the masks never freeze"),
    ("tl1", dict(begin=5, end=5), "begin and end are both step 5: the method's active range is empty"),
])
def test_times_that_do_not_fit_the_run_are_said(recipe, overrides, expected):
    messages = said(recipe, 40, **overrides)
    assert len(messages) == 1 and expected in messages[0], messages


@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
@pytest.mark.parametrize("total_steps", [3, 1000])
def test_builtin_recipes_fit_any_run(recipe, total_steps):
    assert said(recipe, total_steps) == []


def test_stages_after_the_run_are_said():
    messages = said("dual", 40, **{})  # stages at fractions of the run: fine
    assert messages == []
    recipe = {"version": 1, "stages": [{"name": "late", "begin": 50, "end": 60}],
              "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "tl1", "params": {"stage": "late"}}]}
    messages = said(recipe, 40)
    assert len(messages) == 1 and "stage 'late' begin is step 50" in messages[0], messages


def test_a_stage_the_run_rounds_to_no_step_is_said_once():
    # dual's weights stage is 0.3-0.6 of the run: at 2 steps both ends round to step 1, and the l1
    # phase was skipped without a word (the prune still happens at the stage's begin)
    messages = said("dual", 2)
    assert len(messages) == 1, messages
    assert ("stage 'weights' of recipe 'dual' is empty in a run of total_steps=2 (it begins and ends at step 1): "
            "rule 0 (l1-prune) gets no step inside it") in messages[0]
    # two rules in one empty stage: one line naming both, not the per-rule "active range is empty" as well
    recipe = {"version": 1, "stages": [{"name": "short", "begin": 5, "end": 5}, {"name": "rest", "begin": 5, "end": None}],
              "rules": [{"match": {"type": "Conv2d"}, "method": "tl1", "params": {"stage": "short"}},
                        {"match": {"type": "Linear"}, "method": "l1-prune", "params": {"stage": "short"}}]}
    messages = said(recipe, 40)
    assert len(messages) == 1 and "rules 0 (tl1), 1 (l1-prune) get no step inside it" in messages[0], messages
    assert said("dual", 3) == []


def finalize_after(recipe, steps, total_steps=20) -> list[str]:
    """Train ``steps`` of ``total_steps`` with ``recipe``, then finalize: what finalize says of the schedule."""
    model = sparsify.sparsify(net(), recipe, total_steps=total_steps, example_inputs=torch.zeros(1, 3, 8, 8))
    opt = torch.optim.SGD(sparsify.param_groups(model), lr=0.01)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(model)
        sparsify.finalize(model, (x,))
    return [str(w.message) for w in caught if str(w.message).startswith("sparsify.finalize: at step")]


@pytest.mark.parametrize("recipe,steps", [("st3", 12), ("nm-2-4", 12)])
def test_finalize_before_a_fix_is_said(recipe, steps):
    """ST-3 / N:M stopped after their target but before their fix (step 18 of 20) finalized quietly."""
    said = finalize_after(recipe, steps)
    assert len(said) == 1 and "at step 12 the" in said[0] and "is before its fix at step 18" in said[0], said


@pytest.mark.parametrize("recipe", ["st3", "nm-2-4"])
def test_finalize_after_the_fix_is_quiet(recipe):
    assert finalize_after(recipe, 20) == []
