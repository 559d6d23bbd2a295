"""A traced graph that computes something else than its module runs the module's own forward.

torch.fx records whatever branch Python takes on a proxy: ``isinstance(x, torch.Tensor)`` is
False for one, so a forward that checks it silently lost its tensor branch, and the sparsified
model trained something else than the model (no error anywhere). With ``example_inputs`` every
graph is now run against its module on them (passes/reproduce.py) and, where they differ, the
module is treated like one torch.fx could not trace (docs/capture.md#graphs-are-checked).
"""
from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import sparsify
from passes.reproduce import reproduces, same_outputs
from passes.mistraced import NOT_REPRODUCED, RANDOM_DRAW
from passes.tracing import CallRecord, trace
from strategies import Residual, build_model, count_example, example_input, model_specs


def _mistraced(m: nn.Module) -> None:
    """``m``'s forward takes the sine of its input when it is not a tensor: the eager forward never
    does, a torch.fx trace always does (its input is a proxy), and tracing raises nothing."""
    base = type(m)

    def forward(self, x):
        return base.forward(self, x if isinstance(x, torch.Tensor) else torch.sin(x))

    m.__class__ = type(f"Mistraced{base.__name__}", (base,), {"forward": forward})


def _untraceable(m: nn.Module) -> None:
    """The same forward as an eager call of a :func:`_mistraced` module, which torch.fx refuses."""
    base = type(m)

    def forward(self, x):
        if x.numel() >= 0:  # a proxy cannot be a condition
            return base.forward(self, x)

    m.__class__ = type(f"Untraceable{base.__name__}", (base,), {"forward": forward})


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


RECIPES = sorted(sparsify.builtin_recipes())


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_a_mistraced_module_is_rewritten_like_an_untraceable_one(data):
    """Property, over every built-in recipe: a model whose root, Sequentials or residual blocks
    answer ``isinstance`` wrongly while traced gets the plan and the training forward of the same
    model with those pieces untraceable (each runs its own forward, its children are traced one
    by one)."""
    count_example()
    spec = data.draw(model_specs(dims=(2,), max_blocks=4))
    recipe = data.draw(st.sampled_from(RECIPES))
    example = example_input(spec)
    wrong, refused = build_model(spec), build_model(spec)
    refused.load_state_dict(wrong.state_dict())
    names = [n for n, m in wrong.named_modules() if n in ("", "blocks", "head") or isinstance(m, Residual)]
    for name in data.draw(st.sets(st.sampled_from(names), min_size=1)):
        _mistraced(wrong.get_submodule(name))
        _untraceable(refused.get_submodule(name))
    plans = [_quiet(sparsify.plan, m, recipe, example_inputs=example) for m in (wrong, refused)]
    assert [(e.name, e.method, e.rule) for e in plans[0].entries] == [(e.name, e.method, e.rule) for e in plans[1].entries]
    assert sorted(f["name"] for f in plans[0].fallbacks) == sorted(f["name"] for f in plans[1].fallbacks)
    outs = []
    for m in (wrong, refused):
        torch.manual_seed(0)
        s = _quiet(sparsify.sparsify, m, recipe, example_inputs=example, total_steps=10)
        torch.manual_seed(1)
        outs.append(s.train()(example))
    assert torch.equal(outs[0], outs[1])


class Gate(nn.Module):
    """A block scaled by an optional tensor (a mask, an adapter's scale), applied only when it is a
    tensor: the common way to write an optional input, wrong in a torch.fx graph."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, scale=None):
        h = torch.relu(self.fc1(x))
        if isinstance(scale, torch.Tensor):
            h = h * scale
        return self.fc2(h)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = Gate(), Gate(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x, x.new_full((16,), 2.0))))


@pytest.mark.parametrize("capture", ["fx", "auto"])
def test_an_optional_tensor_argument_is_applied(capture):
    """Before: the graph dropped ``h * scale`` (max difference 0.05 at step 0, the plan said
    "captured by torch.fx: <root>"). Now ``a`` runs its own forward, a leaf of the root's graph,
    and the plan says why (``auto`` then takes torch.export's graph, which reaches both ReLUs)."""
    torch.manual_seed(0)
    model, x = GatedNet(), torch.randn(4, 8)
    m = _quiet(sparsify.sparsify, model, "tl1", example_inputs=x, copy=True, capture=capture)
    assert torch.equal(m.train()(x), model(x))
    assert torch.equal(m.eval()(x), model(x))
    plan = _quiet(sparsify.plan, model, "tl1", example_inputs=x, capture=capture)
    if capture == "fx":
        assert {f["name"]: f["reason"] for f in plan.fallbacks} == {"a": NOT_REPRODUCED}
        assert "computes something else than its forward" in str(plan)
    else:
        assert plan.captures[0]["capture"] == "torch.export" and len(plan.rewritten) == 2


class InPlace(nn.Module):
    def forward(self, x, cache):
        x.mul_(2)  # changes its input
        cache.append(x.sum())  # and an object it was given
        return x + cache[-1]


def test_no_false_alarm_from_inputs_changed_in_place_random_draws_or_running_statistics():
    """Each forward gets its own copy of the inputs, and both start from the same random state and
    buffers, which are put back afterwards."""
    import torch.fx as fx
    m = InPlace()
    x, cache = torch.ones(3), []
    assert reproduces(m, fx.symbolic_trace(m), (x, cache), {}) is True
    assert torch.equal(x, torch.ones(3)) and cache == []

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    before = copy.deepcopy(net.state_dict())
    x, gm = torch.randn(8, 4), fx.symbolic_trace(net)
    rng = torch.random.get_rng_state()
    assert reproduces(net, gm, (x,), {}) is True
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_what_cannot_be_checked_is_not_called_wrong():
    """A forward that raises on the inputs, or weights on the meta device: ``None`` (kept)."""
    import torch.fx as fx
    net = nn.Linear(4, 4)
    assert reproduces(net, fx.symbolic_trace(net), (torch.randn(2, 5),), {}) is None
    meta = nn.Linear(4, 4, device="meta")
    assert reproduces(meta, fx.symbolic_trace(meta), (torch.randn(2, 4),), {}) is None


def test_outputs_compare_by_structure_and_value():
    class Cache:  # an object whose identity differs between any two forwards
        pass
    assert same_outputs({"logits": torch.ones(2), "cache": Cache()}, {"logits": torch.ones(2), "cache": Cache()})
    assert not same_outputs({"logits": torch.ones(2)}, {"logits": torch.ones(2), "hidden": torch.ones(2)})
    assert not same_outputs((torch.ones(2),), (torch.ones(2), torch.ones(2)))
    assert not same_outputs(torch.ones(2), torch.ones(2, dtype=torch.float64))
    assert not same_outputs(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert same_outputs(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    # half precision: a rounding unit apart is the same (another GPU kernel), in float32 it is not
    x = torch.linspace(1, 2, 50)
    assert same_outputs(x.bfloat16(), (x * (1 + 2 ** -8)).bfloat16())
    assert not same_outputs(x, x * (1 + 2 ** -8))


def test_each_child_is_checked_on_its_own_inputs():
    """Below an untraceable root each traced child is checked on what the root passed it: only
    the mistraced child falls back, the others keep their graphs."""
    torch.manual_seed(0)
    model, x = GatedNet(), torch.randn(4, 8)
    _untraceable(model)
    r = trace(model.train(), calls=CallRecord(model, (x,)))
    assert {f.name: f.reason for f in r.fallbacks if f.name} == {"a": NOT_REPRODUCED}
    assert "b" in r.graphs and "a" not in r.graphs
    assert torch.equal(r.module(x), GatedNet.forward(model, x))


class LayerDrop(nn.Module):
    """LayerDrop written with Python's random (fairseq, x-transformers' ``layer_dropout``)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            if self.training and random.random() < 0.5:
                continue
            x = torch.relu(layer(x))
        return self.head(x)


@pytest.mark.parametrize("with_example", [True, False])
def test_a_python_random_draw_is_not_frozen_into_a_graph(with_example):
    """torch.fx ran ``random.random()`` once while tracing: the graph skipped the same layers on
    every call (3 of 20 seeds passed the output check; one graph called only ``head``). A forward
    that draws while traced runs its own forward, with or without example inputs, and tracing
    leaves Python's generator where it was."""
    x = torch.randn(4, 16)
    for seed in range(4):
        random.seed(seed)
        state = random.getstate()
        m = _quiet(sparsify.sparsify, LayerDrop(), "st3", example_inputs=x if with_example else None,
                   total_steps=10)
        assert random.getstate() == state
        assert len({tuple(m.train()(x)[0].tolist()) for _ in range(30)}) > 1
    plan = _quiet(sparsify.plan, LayerDrop(), "st3", example_inputs=x if with_example else None)
    assert [(f["name"], f["reason"]) for f in plan.fallbacks] == [("", RANDOM_DRAW)]


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32, affine=False)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Rounded(Normed):
    def forward(self, x):  # another order of operations: the same values up to rounding
        return super().forward(x * (1 + 1e-7))


def test_rounding_is_no_difference_where_a_sum_is_near_zero():
    """A BatchNorm output sums to about zero, so comparing its signed sum relative to itself
    called rounding a difference (kornia's HardNet: its exported graph was refused)."""
    import torch.fx as fx
    torch.manual_seed(0)
    net = Normed().train()
    graph = fx.symbolic_trace(Rounded()).graph
    assert reproduces(net, fx.GraphModule(net, graph), (torch.randn(4, 1, 32, 32),), {}) is True


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if isinstance(y, torch.Tensor) else y.no_such_method()  # a proxy takes this branch


def test_a_graph_that_raises_in_the_check_prints_nothing(capfd):
    plan = _quiet(sparsify.plan, Raising(), "st3", example_inputs=torch.randn(2, 8))
    assert [f["name"] for f in plan.fallbacks] == [""]
    assert capfd.readouterr().err == ""


class MCDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        x = F.dropout(F.relu(self.conv1(x)), 0.2, training=True)  # active in eval too
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_finalize_compares_a_model_random_in_eval_from_one_random_state(recipe):
    """finalize ran the sparse and the finalized model from different random states: a model
    that draws in eval (MC dropout, augmentation layers) raised FinalizeError naming conv2."""
    torch.manual_seed(0)
    m = _quiet(sparsify.sparsify, MCDropout(), recipe, example_inputs=torch.randn(2, 3, 16, 16), total_steps=3)
    for _ in range(3):
        sparsify.step(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsify.FinalizeWarning)
        warnings.filterwarnings("ignore", message=".*schedule.*")
        final = sparsify.finalize(m)
    assert not any(type(x).__module__.startswith("sparsify") for x in final.modules())


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Sequential(nn.Linear(4, 4))
        _mistraced(self.b)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_reproduced_graph_vouches_for_shallower_graphs_only(monkeypatch):
    """sparsify traces twice when its rules need less depth than the first trace went (the first
    one finds the sites): a graph tracing through no more than one that reproduced is not run
    again, one tracing through more is."""
    import passes.tracing as tracing
    model = nn.Sequential(_Block()).train()
    calls = CallRecord(model, (torch.randn(2, 4),))
    checked = []
    monkeypatch.setattr(tracing, "reproduces", lambda *a: checked.append(a[0]) or reproduces(*a))
    shallow = trace(model, lambda name, m: name != "0.b", calls=calls)  # b stays a leaf: right
    assert len(checked) == 1 and not shallow.fallbacks
    again = trace(model, lambda name, m: name not in ("0", "0.b"), calls=calls)
    assert len(checked) == 1 and not again.fallbacks
    deep = trace(model, calls=calls)  # through b, which the first graph did not vouch for
    assert len(checked) > 1 and [(f.name, f.reason) for f in deep.fallbacks] == [("0.b", NOT_REPRODUCED)]
