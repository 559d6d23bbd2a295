"""Properties of ``sparsify`` over random models and random recipes (see tests/strategies.py)."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import (build_model, count_example, example_input, models_and_recipes, quiet_sparsify, recipes,
                        model_specs,
                        weight_layer_names)

import sparsify
from sparsify.methods import SparseWeightMixin
from sparsify.core.state import find_state


def outputs(model, x, mode: str):
    model.train(mode == "train")
    with torch.no_grad():
        return model(x)


def graph_modules(model):
    return [m for m in model.modules() if isinstance(m, fx.GraphModule)]


def rewritten_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, SparseWeightMixin)}


def train(model, spec, steps: int, seed: int = 1):
    """A few SGD steps with momentum (so optimizer state matters) and sparsify.step after each."""
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-3), lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        x = example_input(spec, seed=seed + i)
        loss = F.mse_loss(model(x), torch.zeros(()).expand_as(model(x))) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model)
    return opt


@given(models_and_recipes())
def test_graph_lints_and_shapes_match(case):
    count_example()
    spec, model, recipe = case
    x = example_input(spec)
    m = quiet_sparsify(model, recipe, example_inputs=x)
    assert graph_modules(m), "the root or a submodule was traced"
    for gm in graph_modules(m):
        gm.graph.lint()
    for mode in ("train", "eval"):
        assert outputs(m, x, mode).shape == outputs(model, x, mode).shape
    if rewritten_names(m):
        train(m, spec, 2)
        assert outputs(m, x, "eval").shape == outputs(model, x, "eval").shape


@given(models_and_recipes(sparsity=0.0))
def test_sparsity_zero_changes_nothing(case):
    count_example()
    spec, model, recipe = case
    x = example_input(spec)
    reference = copy.deepcopy(model)
    m = quiet_sparsify(model, recipe, example_inputs=x)
    # eval first (train mode updates BatchNorm statistics in both models alike)
    assert torch.equal(outputs(m, x, "eval"), outputs(reference, x, "eval"))
    assert torch.equal(outputs(m, x, "train"), outputs(reference, x, "train"))
    assert torch.equal(outputs(m, x, "eval"), outputs(reference, x, "eval"))


@given(models_and_recipes())
def test_plan_names_exactly_the_rewritten_layers(case):
    count_example()
    spec, model, recipe = case
    x = example_input(spec)
    plan = sparsify.plan(model, recipe, example_inputs=x)
    m = quiet_sparsify(model, recipe, example_inputs=x)
    planned = {e.name for e in plan.rewritten}
    assert planned == rewritten_names(m)
    members = {name for g in find_state(m).groups.values() for name in g.members}
    assert members == planned
    # every Conv/Linear appears in the plan exactly once: rewritten, or dense with a reason
    layers = weight_layer_names(model)
    dense = [e for e in plan.dense if e.name in layers]
    assert sorted(planned | {e.name for e in dense}) == sorted(layers)
    assert len(dense) + len(planned & set(layers)) == len(layers)
    assert all(e.reason for e in plan.dense)
    assert sparsify.plan(model, recipe, example_inputs=x).to_dict() == plan.to_dict(), "plan is deterministic"


@given(models_and_recipes())
def test_later_rules_win(case):
    count_example()
    spec, model, recipe = case
    x = example_input(spec)
    layers = set(weight_layer_names(model))
    everything_dense = dict(recipe, rules=recipe["rules"] + [{"match": {"name": "**"}, "method": None}])
    plan = sparsify.plan(model, everything_dense, example_inputs=x)
    assert not plan.rewritten
    last = len(everything_dense["rules"]) - 1
    assert all(e.rule == last for e in plan.dense if e.name in layers)
    types = sorted({type(m).__name__ for n, m in model.named_modules() if n in layers})
    all_sparse = dict(recipe, rules=recipe["rules"] + [{"match": {"type": types}, "method": "st3"}])
    plan = sparsify.plan(model, all_sparse, example_inputs=x)
    assert {e.name for e in plan.rewritten} == layers
    assert {e.rule for e in plan.rewritten} == {len(all_sparse["rules"]) - 1}


@given(models_and_recipes(), st.integers(0, 6))
def test_state_dict_resumes_exactly(case, steps):
    count_example()
    spec, model, recipe = case
    x = example_input(spec)
    original = copy.deepcopy(model.state_dict())
    m1 = quiet_sparsify(model, recipe, example_inputs=x)
    for k, v in model.state_dict().items():  # sparsify itself writes nothing into the shared tensors
        assert torch.equal(v, original[k]), f"sparsify changed the caller's model at {k}"
    opt1 = train(m1, spec, steps)
    m2 = quiet_sparsify(build_model(spec), recipe, example_inputs=x)
    m2.load_state_dict(m1.state_dict())
    assert int(find_state(m2).step) == int(find_state(m1).step) == steps
    assert torch.equal(outputs(m1, x, "eval"), outputs(m2, x, "eval"))
    # continuing both runs gives the same models (optimizer state carried separately, as usual)
    opt2 = torch.optim.SGD(sparsify.param_groups(m2, 1e-3), lr=0.05, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))  # as through torch.save: no shared buffers
    for m, opt in ((m1, opt1), (m2, opt2)):
        m.train()
        loss = F.mse_loss(m(x), torch.zeros(()).expand_as(m(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)
    assert torch.equal(outputs(m1, x, "eval"), outputs(m2, x, "eval"))
    assert int(find_state(m2).step) == steps + 1


@given(models_and_recipes(), st.integers(0, 8))
def test_finalize_matches_sparse_eval(case, steps):
    count_example()
    spec, model, recipe = case
    x = example_input(spec)
    m = quiet_sparsify(model, recipe, example_inputs=x)
    train(m, spec, steps)
    final = sparsify.finalize(m)
    assert not rewritten_names(final)
    assert not any(isinstance(mod, type(find_state(m))) for mod in final.modules())
    other = example_input(spec, seed=99)
    expected = outputs(m, other, "eval")
    got = final(other)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # finalized weights carry the sparsity the report shows
    rep = sparsify.report(m)
    mods = dict(final.named_modules())
    for row in rep.layers:
        assert int(torch.count_nonzero(mods[row.name].weight)) == row.nonzero_params


@given(model_specs(), st.data())
def test_report_counts_zeros(spec, data):
    count_example()
    model = build_model(spec)
    recipe = data.draw(recipes(model))
    x = example_input(spec)
    m = quiet_sparsify(model, recipe, example_inputs=x)
    train(m, spec, data.draw(st.integers(0, 8)))
    rep = sparsify.report(m)
    mods = dict(m.named_modules())
    for row in rep.layers:
        w = mods[row.name].effective_weight().detach()
        assert row.params == w.numel()
        assert row.nonzero_params == int(torch.count_nonzero(w))
        assert row.weight_sparsity == 1 - row.nonzero_params / row.params
    rep.to_json()
    str(rep)
