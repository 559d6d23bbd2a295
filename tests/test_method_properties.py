"""Properties of every built-in method over random models and random recipes that mix a weight
method (st3, str, magnitude/gmp, nm, l1-prune, sas, semi-structured) with an activation
regularizer (tl1, activation-l1, activation-hoyer), see tests/strategies.py for the models.

Invariants: the graphs lint, output shapes are kept, a method that starts as the identity changes
nothing before it begins, ``plan`` names exactly what was rewritten, ``state_dict`` loads into a
fresh ``sparsify`` of the same model and recipe and continues identically, ``finalize`` gives the
eval outputs, and the model survives ``.double()`` (and trains and finalizes after it),
``copy.deepcopy`` and pickle."""
from __future__ import annotations

import copy
import pickle

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_model, count_example, example_input, model_specs, quiet_sparsify

import sparsify
from sparsify.core.state import find_state

#: 4x the profile's examples per property (default profile: 5 x 80 here + 7 x 20 in test_properties.py
#: = 540 examples; HYPOTHESIS_PROFILE=deep: 10x that)
EXAMPLES = settings.default.max_examples * 4
TOTAL = 8  # total_steps of every drawn recipe (times are drawn as steps)
WEIGHT_MATCH = {"type": ["Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d", "Linear"]}
ACT_MATCH = {"type": ["ReLU", "GELU"], "op": ["relu", "gelu"]}
#: methods whose layers compute exactly like the dense ones until their ``begin``
STARTS_AS_IDENTITY = {"st3", "magnitude", "nm", "l1-prune", "semi-structured"}


@st.composite
def weight_rules(draw):
    method = draw(st.sampled_from(["st3", "str", "magnitude", "nm", "l1-prune", "sas", "semi-structured"]))
    begin = draw(st.integers(1, 4))
    end = draw(st.integers(begin, 6))
    sparsity = draw(st.sampled_from([0.3, 0.5, 0.8]))
    params = {
        "st3": lambda: {"sparsity": sparsity, "begin": begin, "end": end, "sigma": draw(st.booleans()),
                        "fix": draw(st.sampled_from([None, 7]))},
        "str": lambda: {"s_init": draw(st.sampled_from([-6.0, -3.0])),
                        "granularity": draw(st.sampled_from(["layer", "channel", "global"]))},
        "magnitude": lambda: {"sparsity": sparsity, "begin": begin, "end": end,
                              "scope": draw(st.sampled_from(["global", "layer"]))},
        "nm": lambda: {"n": 2, "m": 4, "begin": begin, "decay": draw(st.sampled_from([0.0, 2e-4]))},
        "l1-prune": lambda: {"l1": 1e-4, "sparsity": sparsity, "begin": begin, "end": end + 1, "prune_at": 0.5},
        "sas": lambda: {"m": draw(st.sampled_from([2, 4])), "not_relu": draw(st.sampled_from(["dense", "as_is"]))},
        "semi-structured": lambda: {"sparsity": 0.3, "begin": begin, "end": end + 1, "skip_1x1": False},
    }[method]()
    return {"match": WEIGHT_MATCH, "method": method, "params": params}


@st.composite
def act_rules(draw):
    method = draw(st.sampled_from(["tl1", "activation-l1", "activation-hoyer"]))
    params = {"lam": draw(st.sampled_from([1e-4, 1e-2])), "begin": draw(st.integers(0, 3)),
              "placement": draw(st.sampled_from(["pre", "post"])) if method == "tl1" else "post"}
    return {"match": ACT_MATCH, "method": method, "params": params}


@st.composite
def mixed_cases(draw):
    """``(spec, recipe)``: a tiny random model and a recipe with a weight rule, an activation
    rule, or both."""
    spec = draw(model_specs(max_blocks=3))
    rules = draw(st.sampled_from([["w"], ["a"], ["w", "a"]]))
    drawn = [draw(weight_rules()) if r == "w" else draw(act_rules()) for r in rules]
    return spec, {"version": 1, "name": "drawn", "rules": drawn}


def make(spec, recipe):
    model = build_model(spec)
    return model, quiet_sparsify(model, recipe, example_inputs=(example_input(spec),), total_steps=TOTAL)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def train(model, spec, steps: int, opt=None, start: int = 0):
    opt = opt or torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01, momentum=0.9)
    for i in range(start, start + steps):
        model.train()
        torch.manual_seed(i)
        x = example_input(spec, seed=10 + i)
        out = model(x)
        task = F.mse_loss(out, torch.zeros_like(out))
        opt.zero_grad()
        (task + sparsify.penalty(model)).backward()
        opt.step()
        sparsify.step(model, loss=task)
    return opt


@settings(max_examples=EXAMPLES)
@given(mixed_cases())
def test_lint_shapes_and_identity_before_begin(case):
    count_example()
    spec, recipe = case
    dense, model = make(spec, recipe)
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        gm.graph.lint()
    x = example_input(spec, seed=3)
    ref, out = outputs(dense, x), outputs(model, x)
    assert out.shape == ref.shape
    methods = {r["method"] for r in recipe["rules"]}
    if methods <= STARTS_AS_IDENTITY | {"tl1", "activation-l1", "activation-hoyer"}:
        assert torch.equal(out, ref), methods
    elif methods & {"sas"} and methods <= {"sas", "tl1", "activation-l1", "activation-hoyer"}:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # relu coefficients: same function


@settings(max_examples=EXAMPLES)
@given(mixed_cases())
def test_plan_names_what_was_rewritten(case):
    count_example()
    spec, recipe = case
    _, model = make(spec, recipe)
    plan = sparsify.plan(build_model(spec), recipe, example_inputs=(example_input(spec),), total_steps=TOTAL)
    groups = find_state(model).groups
    for i, rule in enumerate(recipe["rules"]):
        planned = [e.name for e in plan.entries if e.method == rule["method"] and e.rule == i]
        group = [g for name, g in groups.items() if name.startswith(f"rule{i}_")]
        members = len(group[0].members) if group else 0
        assert len(planned) == members, (rule["method"], planned, members)


@settings(max_examples=EXAMPLES)
@given(mixed_cases(), st.integers(0, 6))
def test_state_dict_round_trip_continues_identically(case, steps):
    count_example()
    spec, recipe = case
    _, model = make(spec, recipe)
    opt = train(model, spec, steps)
    _, fresh = make(spec, recipe)
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    x = example_input(spec, seed=4)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    opt2 = torch.optim.SGD(sparsify.param_groups(fresh, 1e-4), lr=0.01, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert int(find_state(fresh).step) == steps
    # both go on with the same batches: every method's state (masks, thresholds, draws) came along
    train(model, spec, 2, opt, start=steps)
    train(fresh, spec, 2, opt2, start=steps)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    theirs = fresh.state_dict()
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, theirs[k]), k


@settings(max_examples=EXAMPLES)
@given(mixed_cases(), st.integers(0, 8))
def test_finalize_equals_the_eval_outputs(case, steps):
    count_example()
    spec, recipe = case
    _, model = make(spec, recipe)
    train(model, spec, steps)
    x = example_input(spec, seed=5)
    ref = outputs(model, x)
    final = sparsify.finalize(model, (x,))
    torch.testing.assert_close(outputs(final, x), ref, rtol=1e-4, atol=1e-5)
    # plain modules, and no hook of sparsify's left on them
    assert not [type(m).__name__ for m in final.modules() if type(m).__module__.startswith("sparsify.core")]
    hooks = [h for m in final.modules() for d in (m._forward_hooks, m._forward_pre_hooks, m._state_dict_hooks,
             m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks) for h in d.values()]
    assert not [h for h in hooks if getattr(h, "__module__", "").startswith("sparsify")]


@settings(max_examples=EXAMPLES)
@given(mixed_cases(), st.integers(0, 5))
def test_copies_and_dtype_moves(case, steps):
    count_example()
    spec, recipe = case
    _, model = make(spec, recipe)
    train(model, spec, steps)
    x = example_input(spec, seed=6)
    ref = outputs(model, x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(outputs(other, x), ref)
        members = {id(m) for m in other.modules()}
        assert all(id(m) in members for g in find_state(other).groups.values() for m in g.members.values())
    model.double()
    torch.testing.assert_close(outputs(model, x.double()), ref.double(), rtol=1e-4, atol=1e-5)
    # it trains on in float64, and finalize checks it on the example inputs sparsify kept, which
    # were cast with it
    model.train()
    out = model(x.double())
    (F.mse_loss(out, torch.zeros_like(out)) + sparsify.penalty(model)).backward()
    sparsify.step(model)
    final = sparsify.finalize(model)
    torch.testing.assert_close(outputs(final, x.double()), outputs(model, x.double()), rtol=1e-6, atol=1e-7)
