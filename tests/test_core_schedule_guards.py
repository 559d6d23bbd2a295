"""Regression guards for sparsify.core's schedule and step bookkeeping (schedules, pace, threshold,
averaging, advance, diverged, penalty_watch, step_checks, keep, staging) and the methods that use
them (st3, str): each test pins a behaviour a user depends on that a mutation of the code
once changed without the suite noticing."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.schedules import ScheduleError, resolve_time
from sparsify.core.state import find_state

from warned import said


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# ---------------------------------------------------------------------------------------------
# schedules: recipe times
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("begin", [-1, -0.5])
def test_a_negative_recipe_time_is_refused(begin):
    """A negative begin (a whole step or a fraction) is refused, not read as step -1 or 0."""
    with pytest.raises(ScheduleError, match="must be a step count >= 0"):
        sparsify.sparsify(_mlp(), "gmp", total_steps=100, begin=begin, end=10)


def test_a_step_count_of_two_to_the_62_is_refused():
    """Step counts stop below 2**62 (the bound the error names), 2**62 itself included."""
    with pytest.raises(ScheduleError, match="below 2\\*\\*62"):
        resolve_time(2 ** 62, None, what="end")
    assert resolve_time(2 ** 62 - 1, None) == 2 ** 62 - 1


def test_a_fraction_rounds_to_the_nearest_step():
    """A fraction of the run is rounded, not truncated: 0.29 of 100 steps is step 29, though
    0.29 * 100 is 28.999999999999996 in floating point."""
    assert [resolve_time(f, 100) for f in (0.29, 0.57, 0.07)] == [29, 57, 7]
    assert resolve_time(0.5, 3) == 2  # half-way: Python's round, to the even step
    g = sparsify.sparsify(_mlp(), "gmp", total_steps=100, begin=0.29, end=0.57)
    (group,) = find_state(g).groups.values()
    assert (group.begin, group.end) == (29, 57)


def test_a_one_element_tensor_is_not_taken_for_a_number():
    """A 0-d tensor is a number (begin=torch.tensor(5)); a 1-element 1-d tensor is refused."""
    sparsify.sparsify(_mlp(), "gmp", total_steps=100, begin=torch.tensor(5), end=10)
    with pytest.raises(sparsify.RecipeError, match="begin: must be a number"):
        sparsify.sparsify(_mlp(), "gmp", total_steps=100, begin=torch.tensor([5]), end=10)

# ---------------------------------------------------------------------------------------------
# pace: finalize's look at a model that trained without sparsify.step
# ---------------------------------------------------------------------------------------------

def test_finalize_says_step_was_never_called_on_a_partly_frozen_model():
    """A model with a frozen layer that trained (some gradients) without sparsify.step is told so."""
    net = _mlp()
    net[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frozen layer stays dense: said at sparsify()
        m = sparsify.sparsify(net, "str", example_inputs=torch.randn(2, 8))
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.1)
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    msgs = said(sparsify.finalize, m, check=False)
    assert any("has gradients but sparsify.step was never called" in s for s in msgs), msgs


# ---------------------------------------------------------------------------------------------
# advance: a group that meets non-finite weights
# ---------------------------------------------------------------------------------------------

def test_step_says_a_group_kept_its_thresholds_on_non_finite_weights():
    """A NaN weight at a step without the divergence look (step 3) is still told, by group, and
    the group's threshold stays where it was."""
    m = sparsify.sparsify(_mlp(), "st3", total_steps=10, begin=0, end=5, example_inputs=torch.randn(2, 8))
    sparsify.step(m)
    sparsify.step(m)
    group = m.sparsify_state.groups["rule0_st3"]
    tau = float(group.tau)
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    msgs = said(sparsify.step, m)
    assert any("rule0_st3 (st3) met non-finite weights at step 3" in s for s in msgs), msgs
    assert float(group.tau) == tau


# ---------------------------------------------------------------------------------------------
# averaging: sparsify.sync
# ---------------------------------------------------------------------------------------------

def test_sync_refuses_a_copy_made_for_another_run_length():
    """An averaged copy sparsified with the same recipe but another total_steps is refused: its
    schedules would run at another pace than the model whose masks it is given."""
    net = _mlp()
    model = sparsify.sparsify(net, "gmp", total_steps=100, copy=True)
    other = sparsify.sparsify(net, "gmp", total_steps=50, copy=True)
    ema = torch.optim.swa_utils.AveragedModel(other)
    with pytest.raises(ValueError, match="another recipe or total_steps"):
        sparsify.sync(ema, model)


# ---------------------------------------------------------------------------------------------
# diverged: the message naming non-finite parameters
# ---------------------------------------------------------------------------------------------

def test_a_message_naming_three_of_four_non_finite_parameters_says_there_are_more():
    """Four NaN parameters: the first three are named and " ..." says the list goes on."""
    net = _mlp()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"in 4 parameter\(s\) of the model given \(0\.weight, 0\.bias, 2\.weight \.\.\.\)"):
        sparsify.sparsify(net, "gmp", total_steps=10)


# ---------------------------------------------------------------------------------------------
# penalty_watch: penalties that cannot take a gradient
# ---------------------------------------------------------------------------------------------

def test_the_penalty_of_a_frozen_model_is_returned_and_not_watched():
    """A penalty computed with every parameter frozen (no graph) is returned as a value, and the
    next step does not call it unreached."""
    torch.manual_seed(0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "tl1")
    m.requires_grad_(False)
    m(torch.randn(3, 4))
    p = sparsify.penalty(m)
    assert isinstance(p, torch.Tensor) and not p.requires_grad and float(p) > 0
    m.requires_grad_(True)
    assert not [s for s in said(sparsify.step, m) if "got no gradient" in s]


# ---------------------------------------------------------------------------------------------
# step_checks: what sparsify.step says after a step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [float("inf"), float("-inf"), torch.tensor(float("inf"))])
def test_an_infinite_loss_is_told_as_divergence(loss):
    """An infinite loss, not only NaN, says that training diverged."""
    m = sparsify.sparsify(_mlp(), "gmp", total_steps=10)
    msgs = said(sparsify.step, m, loss=loss)
    assert any(s.startswith("sparsify.step: the loss is") and "inf at step 1" in s for s in msgs), msgs



def test_an_empty_loss_tensor_is_refused_with_its_shape():
    """A loss tensor with no element is not one number: a ValueError naming its shape."""
    m = sparsify.sparsify(_mlp(), "gmp", total_steps=10)
    with pytest.raises(ValueError, match=r"got a tensor of shape \(0,\)"):
        sparsify.step(m, loss=torch.tensor([]))

# ---------------------------------------------------------------------------------------------
# st3: what its schedule says
# ---------------------------------------------------------------------------------------------

def test_st3_says_when_tied_magnitudes_keep_it_short_of_its_target():
    """Constant-initialised weights cannot be split by a magnitude threshold: when st3's ramp ends
    short of its target, a warning says why."""
    net = _mlp()
    with torch.no_grad():
        net[0].weight.fill_(0.1)
        net[2].weight.fill_(0.1)
    m = sparsify.sparsify(net, "st3", total_steps=4, begin=0, end=2, sparsity=0.5, example_inputs=torch.randn(2, 8))
    sparsify.step(m)
    msgs = said(sparsify.step, m)
    assert any(s.startswith("sparsify: st3 reached 0.0% sparsity where its target is 50.0%") for s in msgs), msgs


def test_st3_report_says_hold_from_the_ramps_end_step():
    """At the ramp's end step the target is final: the report's phase is "hold", not "ramp"."""
    m = sparsify.sparsify(_mlp(), "st3", total_steps=10, begin=2, end=4, fix=8, example_inputs=torch.randn(2, 8))
    phases = []
    for _ in range(5):
        sparsify.step(m)
        phases.append(sparsify.report(m).groups["rule0_st3"]["phase"])
    assert phases == ["dense", "ramp", "ramp", "hold", "hold"]


# ---------------------------------------------------------------------------------------------
# str: its params check
# ---------------------------------------------------------------------------------------------

def test_str_refuses_a_positive_s_init_below_one():
    """s_init = 0.5 starts at threshold sigmoid(0.5) = 0.62, pruning every small weight: refused."""
    with pytest.raises(sparsify.RecipeError, match="s_init: 0.5 prunes every weight"):
        sparsify.sparsify(_mlp(), "str", s_init=0.5)


def test_str_does_not_blame_decay_for_a_threshold_parameter_at_zero():
    """s = 0 is a fixed point of weight decay: a threshold parameter that stays at 0 without a
    gradient does not prove that nothing decays it, so no missing-decay warning."""
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "str", s_init=-1.0)
    with torch.no_grad():
        m.get_submodule("0").threshold_param().zero_()
    msgs = said(sparsify.step, m) + said(sparsify.step, m) + said(sparsify.step, m)
    assert not [s for s in msgs if "applies no weight decay" in s], msgs


# ---------------------------------------------------------------------------------------------
# staging: a rule's active range
# ---------------------------------------------------------------------------------------------

def test_a_stage_time_that_needs_total_steps_stays_a_schedule_error():
    """A stage given as a fraction of an unknown run length raises ScheduleError (what a caller
    catches to ask for total_steps), not a plain ValueError."""
    from sparsify.core.contract import GroupContext
    from sparsify.core.staging import active_range
    ctx = GroupContext(nn.Identity(), None, stages=[{"name": "b", "begin": 0.5, "end": None}])
    with pytest.raises(ScheduleError, match="pass total_steps"):
        active_range({"stage": "b"}, ctx, "tl1")


def test_the_report_names_no_stage_outside_every_stage():
    """Before a recipe's only stage and after it, the report's stage is None (null), inside it its name."""
    recipe = {"version": 1, "stages": [{"name": "act", "begin": 2, "end": 4}],
              "rules": [{"match": {"type": ["ReLU"]}, "method": "tl1", "params": {"stage": "act"}}]}
    m = sparsify.sparsify(_mlp(), recipe, total_steps=6, example_inputs=torch.randn(2, 8))
    stages = []
    for _ in range(5):
        stages.append(sparsify.report(m).groups["rule0_tl1"]["stage"])
        sparsify.step(m)
    assert stages == [None, None, "act", "act", None]


def test_st3_report_threshold_is_the_global_one_when_the_first_layer_is_held():
    """A first layer held at min_density has a threshold of its own; the report's group
    threshold is the global one the other layers share."""
    net = _mlp()
    with torch.no_grad():
        net[0].weight.mul_(1e-3)  # would be emptied by the global threshold
    m = sparsify.sparsify(net, "st3", total_steps=4, begin=0, end=0, sparsity=0.9, min_density=0.1,
                          example_inputs=torch.randn(2, 8))
    sparsify.step(m)
    group = sparsify.report(m).groups["rule0_st3"]
    assert group["held_at_min_density"] == ["0"]
    assert group["threshold"] == pytest.approx(float(m[2].tau))
    assert float(m[0].tau) < float(m[2].tau) / 10



def test_a_stage_without_an_end_is_open_ended():
    """A stage that gives no "end" at all runs to the end of training."""
    recipe = {"version": 1, "stages": [{"name": "act", "begin": 2}],
              "rules": [{"match": {"type": ["ReLU"]}, "method": "tl1", "params": {"stage": "act"}}]}
    m = sparsify.sparsify(_mlp(), recipe, total_steps=6, example_inputs=torch.randn(2, 8))
    for _ in range(3):
        sparsify.step(m)
    group = sparsify.report(m).groups["rule0_tl1"]
    assert (group["begin"], group["end"], group["stage"]) == (2, None, "act")
