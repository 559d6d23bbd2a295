"""Core edges a one-line change would silently alter: the min-density floor of the global
threshold (a one-weight layer, a tie at a capped layer's own threshold, a layer the second
threshold puts exactly on its floor), the mode of the modules a rewrite inserts into a model
sparsified in eval mode, what a refused or partial load names, the penalty's refusal and its
.item() warning, and the step at which pruned classes are said."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify
from passes.hooks import remove_hooks
from sparsify.core.keep import guarded_thresholds
from sparsify.core.load_check import moved_keys
from sparsify.core.load_hooks import before_load
from sparsify.methods.regularizers import ActivationRegularizer
from warned import said


def pruned(values, taus):
    return [int((v <= t).sum()) for v, t in zip(values, taus)]


def test_a_one_weight_layer_keeps_its_weight_under_the_floor():
    """min_density keeps ceil(0.01 * 1) = 1 weight of a one-weight layer whose weight lies under
    the global threshold (docs/methods/magnitude.md, min_density)."""
    one, big = torch.tensor([0.001]), torch.arange(1.0, 101.0)
    taus, _ = guarded_thresholds([one, big], 0.5, 0.01)
    assert pruned([one, big], taus)[0] == 0


def test_a_tie_at_a_capped_layers_threshold_does_not_prune_below_its_floor():
    """A layer held at min_density 0.5 of its 10 weights prunes at most 5, even when its 5th and
    6th smallest magnitudes are equal."""
    tied = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.06, 0.07, 0.08, 0.09])
    big = torch.arange(1.0, 101.0)
    taus, _ = guarded_thresholds([tied, big], 0.5, 0.5)
    assert pruned([tied, big], taus)[0] <= 5


def test_modules_inserted_into_an_eval_model_are_in_eval_mode():
    """A model sparsified in eval mode gets its tl1 nodes in eval mode too: an evaluation forward
    records no penalty (the eval-mode forward of docs/methods/tl1.md)."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    m = sparsify.sparsify(net, "tl1", example_inputs=torch.zeros(1, 8))
    inserted = [mod for mod in m.modules() if isinstance(mod, ActivationRegularizer)]
    assert inserted and not any(mod.training for mod in inserted)
    m(torch.randn(2, 8))
    assert float(sparsify.penalty(m)) == 0.0


# ---------------------------------------------------------------------------------------------
# load checks, penalty records and watch, the held layers' report, the last step, partial loads
# ---------------------------------------------------------------------------------------------


def test_an_old_key_that_could_be_two_inserted_modules_is_not_renamed():
    """moved_keys renames a checkpoint key to its module's new name only when exactly one model
    key reads the same with '_' as '.': an ambiguous one is left for load_state_dict to name."""
    assert moved_keys(["a.b_c.mask"], ["a_b_c.mask", "a_b.c.mask"]) == {}
    assert moved_keys(["a.b_c.mask"], ["a_b_c.mask"]) == {"a.b_c.mask": "a_b_c.mask"}


def _refusal(saved_recipe, recipe) -> str:
    def build(r):
        return sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), r, total_steps=4, example_inputs=torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="another sparsify") as err:
        build(recipe).load_state_dict(build(saved_recipe).state_dict())
    return str(err.value)


def test_a_refused_checkpoint_names_a_differing_param_not_the_description():
    """A checkpoint of another run is refused naming the param that differs, never its description
    (a description is not why a run differs: alone, it loads; docs/recipes.md)."""
    def recipe(description, sparsity):
        return {"version": 1, "name": "mine", "description": description,
                "rules": [{"match": {"type": "Linear"}, "method": "magnitude", "params": {"sparsity": sparsity}}]}
    both = _refusal(recipe("a", 0.5), recipe("b", 0.6))
    assert "(rules[0].params.sparsity: 0.5 in the checkpoint, 0.6 here)" in both and "description" not in both, both
    def build(r):
        return sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), r, total_steps=4, example_inputs=torch.zeros(1, 4))
    build(recipe("b", 0.5)).load_state_dict(build(recipe("a", 0.5)).state_dict())


def _tl1():
    torch.manual_seed(0)
    return sparsify.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "tl1",
                             example_inputs=torch.zeros(1, 8))


REFUSED = "penalty holds terms of earlier forwards whose loss was already backpropagated"


def test_a_penalty_is_refused_when_an_earlier_forward_was_backpropagated_without_it():
    """Gradient accumulation adding the penalty on the last micro-batch only is refused by name,
    whichever earlier forward was backpropagated alone: the first of two, or the middle of three
    (after a training-mode forward kept for a metric)."""
    x = torch.randn(4, 8)
    m = _tl1()
    m(x).sum().backward()  # micro-batch 1, without the penalty
    m(x)  # the last micro-batch: its term is live
    with pytest.raises(RuntimeError, match=REFUSED):
        sparsify.penalty(m)
    m = _tl1()
    m(x)  # a forward whose loss is never backpropagated: its term is live
    m(x).sum().backward()
    m(x)
    with pytest.raises(RuntimeError, match=REFUSED):
        sparsify.penalty(m)
    m = _tl1()
    m(x), m(x)  # two views of a batch, one backward later: valid
    assert sparsify.penalty(m) is not None


UNREACHED = "got no gradient before this step"


def test_a_penalty_used_as_a_float_after_a_good_step_is_said_at_that_step():
    """After a step whose penalty reached backward, a step that adds penalty.item() to the loss
    (the regularizer then does nothing) is warned at that very step."""
    m, x = _tl1(), torch.randn(4, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    told = []
    for i in range(3):
        out = m(x)
        p = sparsify.penalty(m)
        loss = out.pow(2).mean() + (p if i == 0 else p.item())
        opt.zero_grad(); loss.backward(); opt.step()
        told.append([w for w in said(sparsify.step, m) if UNREACHED in w])
    assert [len(s) for s in told] == [0, 1, 0], told  # said once per model, at step 2


def test_held_at_min_density_does_not_name_a_layer_the_second_threshold_puts_exactly_on_its_floor():
    """Once a layer is capped, the threshold found again over the others may prune the others
    exactly down to their floors: they are pruned by the common threshold, not held, and the
    report's held_at_min_density names the capped layer only."""
    a = torch.linspace(0.001, 0.01, 10)  # below everything: capped at its floor of 5
    b = torch.tensor([10.5, 20.5, 30.5, 40.5, 45.5, 1000.0, 1001.0, 1002.0, 1003.0, 1004.0])
    c = torch.arange(1.0, 101.0)
    taus, capped = guarded_thresholds([a, b, c], 0.5, 0.5)
    assert capped == [0]
    assert taus[1] == taus[2]  # b shares the others' threshold
    assert pruned([a, b, c], taus) == [5, 5, 50]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 2), nn.Linear(2, 5), nn.Linear(5, 20))
    with torch.no_grad():
        for layer, v in zip(net, (a, b, c)):
            layer.weight.copy_(v[torch.randperm(v.numel())].reshape(layer.weight.shape))
    m = sparsify.sparsify(net, "gmp", total_steps=2, begin=0, end=0, sparsity=0.5, min_density=0.5,
                          example_inputs=torch.zeros(1, 5))
    sparsify.step(m)
    (group,) = sparsify.report(m).groups.values()
    assert group["held_at_min_density"] == ["0"], group


DEAD = "outputs pruned (rows"


@pytest.mark.parametrize("recipe, at", [("st3", 3), ("gmp", 0)])
def test_pruned_classes_are_said_once_when_they_are_dead_for_good(recipe, at):
    """Output rows of the last layer pruned whole at step 1 are said once: at the step where the
    group fixes its masks (gmp: its ramp's end, step 1), else at step total_steps (st3 with
    "fix": null, whose rows could come back until training ends), not at every step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[2].weight[:2] *= 1e-4  # two classes a global threshold takes whole
    fix = {"fix": None} if recipe == "st3" else {}
    m = sparsify.sparsify(net, recipe, total_steps=4, begin=0, end=1, sparsity=0.5,
                          example_inputs=torch.zeros(1, 8), **fix)
    told = [[w for w in said(sparsify.step, m) if DEAD in w] for _ in range(4)]
    assert [len(s) for s in told] == [int(i == at) for i in range(4)], told
    assert "2: every weight of 2 of its 4 outputs pruned (rows 0, 1)" in told[at][0]


NO_ENTRIES = "holds no entries for"


def _as_pickled_before_load_prefix():
    """A stepped gmp model as one pickled before its load pre-hook (which sets ``load_prefix``) and
    ``load_prefix`` existed: a pickled hook is the current function, so only such a model has none."""
    torch.manual_seed(0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "gmp", total_steps=10,
                          example_inputs=torch.zeros(1, 8))
    for _ in range(2):
        sparsify.step(m)
    remove_hooks(m, "_load_state_dict_pre_hooks", before_load)
    del m.sparsify_state.load_prefix
    return m


def test_an_old_pickled_model_still_names_the_sparse_layer_a_checkpoint_lacks():
    """A model pickled before load_prefix existed falls back to matching names: a checkpoint
    without layer 2's entries names 2, loaded directly or through a wrapper's prefix, and a
    whole checkpoint names nothing."""
    state = _as_pickled_before_load_prefix().state_dict()
    without_2 = {k: v for k, v in state.items() if not k.startswith("2.")}

    def no_entries(model, sd):
        return [w for w in said(model.load_state_dict, sd, strict=False) if NO_ENTRIES in w]
    direct = no_entries(_as_pickled_before_load_prefix(), without_2)
    assert len(direct) == 1 and "for 1 sparse layer(s) (2;" in direct[0], direct
    wrapped = no_entries(nn.ModuleDict({"net": _as_pickled_before_load_prefix()}),
                         {f"net.{k}": v for k, v in without_2.items()})
    assert len(wrapped) == 1 and "for 1 sparse layer(s) (2;" in wrapped[0], wrapped
    whole = no_entries(nn.ModuleDict({"net": _as_pickled_before_load_prefix()}), {f"net.{k}": v for k, v in state.items()})
    assert whole == []
