"""A group whose update raises inside sparsify.step (a method of the user's): the other groups still
take the step, and the error names the group and its method. Before, the step counter had moved,
the groups after it were skipped for that step (a GMP prune at that step never happened), and the
raw exception named neither."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.contract import Group, Method
from sparsify.core.registry import REGISTRY


class _Flaky(Group):
    def writes_weights(self, step):
        return False

    def update(self, step, loss=None):
        if step == 2:
            raise KeyError("no such thing")


class _FlakyMethod(Method):
    name, group_class = "flaky-test", _Flaky

    def apply(self, site, params):
        site.replace(site.module)


def test_a_failing_group_misses_its_step_and_the_others_take_it(monkeypatch):
    monkeypatch.setitem(REGISTRY, _FlakyMethod.name, _FlakyMethod())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    recipe = {"version": 1, "rules": [
        {"match": {"name": "0"}, "method": _FlakyMethod.name},
        {"match": {"name": "2"}, "method": "magnitude", "params": {"sparsity": 0.5, "begin": 2, "end": 2}}]}
    m = sparsify.sparsify(net, recipe, total_steps=4, example_inputs=torch.randn(2, 4))
    assert sparsify.step(m) == 1
    with pytest.raises(RuntimeError, match=r"^sparsify.step: rule0_flaky_test \(flaky-test\) raised at step 2: "
                                           r"KeyError: 'no such thing'; the other groups \(rule1_magnitude\) "
                                           r"took step 2, rule0_flaky_test missed it$"):
        sparsify.step(m)
    assert int(m.sparsify_state.step) == 2
    assert int((m[2].effective_weight() == 0).sum()) == 6  # the prune at step 2 happened
    assert sparsify.step(m) == 3


def test_two_failing_groups_are_both_named_and_neither_is_said_to_have_taken_the_step(monkeypatch):
    """The error named the first failing group only and listed the second among those that took the step."""
    monkeypatch.setitem(REGISTRY, _FlakyMethod.name, _FlakyMethod())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    recipe = {"version": 1, "rules": [
        {"match": {"name": "0"}, "method": _FlakyMethod.name},
        {"match": {"name": "2"}, "method": _FlakyMethod.name, "params": {}},
        {"match": {"name": "4"}, "method": "magnitude", "params": {"sparsity": 0.5, "begin": 2, "end": 2}}]}
    m = sparsify.sparsify(net, recipe, total_steps=4, example_inputs=torch.randn(2, 4))
    sparsify.step(m)
    with pytest.raises(RuntimeError, match=r"^sparsify.step: rule0_flaky_test \(flaky-test\) raised at step 2: "
                                           r"KeyError: 'no such thing'; rule1_flaky_test \(flaky-test\) raised too: "
                                           r"KeyError: 'no such thing'; the other groups \(rule2_magnitude\) "
                                           r"took step 2, rule0_flaky_test and rule1_flaky_test missed it$"):
        sparsify.step(m)
    assert int((m[4].effective_weight() == 0).sum()) == 6  # the prune at step 2 happened
