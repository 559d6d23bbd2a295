"""Bad input: every error a user can cause says what is wrong and what to do."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsify
from sparsify import RecipeError, ScheduleError
from sparsify.methods import REGISTRY, SparseWeightMixin


def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


X = torch.zeros(1, 3, 6, 6)

RULE = {"match": {"type": "Conv2d"}, "method": "st3"}


def recipe(*rules, **top):
    return {"version": 1, "rules": list(rules) or [RULE], **top}


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{\n  "version": 1,\n  "rules": [\n    {"match": {"type": "Conv2d"}, "method": "st3",}\n  ]\n}\n')
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(str(path))
    col = path.read_text().splitlines()[3].index("}", 45) + 1  # the brace after the trailing comma
    assert f"{path}:4:{col}: malformed JSON" in str(e.value)
    with pytest.raises(RecipeError, match=re.escape(f"{path}:4:{col}")):
        sparsify.sparsify(net(), path)  # a pathlib.Path works too


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        sparsify.load_recipe(str(tmp_path / "nope.json"))
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(RecipeError, match="a recipe is a JSON object, got list"):
        sparsify.load_recipe(str(path))
    with pytest.raises(RecipeError, match="built-in name, a path to a JSON file, or a dict"):
        sparsify.load_recipe(42)


@pytest.mark.jsonschema
@pytest.mark.parametrize("bad, path", [
    (recipe(RULE, extra=1), "$.extra"),
    (recipe({"match": {"type": "Conv2d"}, "method": "st3", "parms": {}}), "$.rules[0].parms"),
    (recipe(RULE, {"match": {"typ": "Conv2d"}, "method": None}), "$.rules[1].match.typ"),
    (recipe({"match": {"type": "Conv2d", "in_channels": {"min": 1, "mx": 3}}, "method": "st3"}),
     "$.rules[0].match.in_channels.mx"),
    (recipe(RULE, stages=[{"name": "a", "begin": 0, "ende": 3}]), "$.stages[0].ende"),
])
def test_unknown_key_names_its_json_path(bad, path):
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(bad)
    key = path.rsplit(".", 1)[1]
    assert f"{path}: unknown key {key!r}" in str(e.value)
    assert "allowed here:" in str(e.value)


@pytest.mark.jsonschema
def test_schema_type_errors_name_the_path():
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].match.first")):
        sparsify.load_recipe(recipe({"match": {"first": "yes"}, "method": None}))
    with pytest.raises(RecipeError, match=re.escape("$.version")):
        sparsify.load_recipe({"version": 2, "rules": [RULE]})
    with pytest.raises(RecipeError, match=re.escape("$.rules")):
        sparsify.load_recipe({"version": 1, "rules": []})


def test_unknown_parameter_and_override():
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.sparsty: unknown parameter of method 'st3'; "
                                                    "its parameters: begin, end, fix, min_density, sigma, sparsity")):
        sparsify.load_recipe(recipe({"match": {"type": "Conv2d"}, "method": "st3", "params": {"sparsty": 0.5}}))
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.foo, $.rules[0].params.bar: unknown parameters")):
        sparsify.load_recipe(recipe({"match": {"type": "Conv2d"}, "method": "st3",
                                     "params": {"sparsity": 0.9, "foo": 1, "bar": 2}}))  # every one, not the first
    with pytest.raises(RecipeError, match="override 'sparsty' is not a parameter of this recipe.*sparsity"):
        sparsify.sparsify(net(), "st3", sparsty=0.5, total_steps=10)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(recipe({"match": {"type": "Conv2d"}, "method": "st4"}))
    msg = str(e.value)
    assert "$.rules[0].method: unknown method 'st4'" in msg
    assert f"known methods: {', '.join(sorted(REGISTRY))}" in msg


def test_unknown_recipe_name_lists_the_builtins():
    with pytest.raises(RecipeError) as e:
        sparsify.sparsify(net(), "st4")
    msg = str(e.value)
    assert "unknown recipe 'st4'" in msg
    for name in sparsify.builtin_recipes():
        assert name in msg
    assert {"st3", "st3-sigma"} <= set(sparsify.builtin_recipes())


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "high", None])
def test_sparsity_outside_unit_interval(bad):
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(recipe({"match": {"type": "Conv2d"}, "method": "st3", "params": {"sparsity": bad}}))
    assert f"$.rules[0].params.sparsity: must be a fraction in [0, 1), got {bad!r}" in str(e.value)


def test_sparsity_override_outside_unit_interval():
    with pytest.raises(RecipeError, match=re.escape("sparsity: must be a fraction in [0, 1), got 1 "
                                                    "(from the call's overrides)")):
        sparsify.sparsify(net(), "st3", sparsity=1, total_steps=10)


def test_fraction_schedule_needs_total_steps():
    with pytest.raises(ScheduleError) as e:
        sparsify.sparsify(net(), "st3")
    msg = str(e.value)
    assert "$.rules[0].params.begin=0.05 is a fraction of the training length" in msg
    assert "pass total_steps=N" in msg
    # steps instead of fractions need no total_steps
    sparsify.sparsify(net(), "st3", begin=0, end=10, fix=20, example_inputs=X)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_total_steps_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="total_steps must be a positive number of optimizer steps"):
        sparsify.sparsify(net(), "st3", total_steps=bad)


def test_bad_times():
    with pytest.raises(ScheduleError, match=re.escape("$.rules[0].params.begin must be a step count >= 0")):
        sparsify.sparsify(net(), "st3", begin=-3, total_steps=10)
    with pytest.raises(ValueError, match=re.escape("end (5) is before begin (10)")):
        sparsify.sparsify(net(), "st3", begin=10, end=5, fix=None)


# ---------------------------------------------------------------------------------------------
# rules that match nothing
# ---------------------------------------------------------------------------------------------

def test_rule_matching_nothing_warns_and_is_in_plan():
    r = recipe(RULE, {"match": {"name": "encoder.**"}, "method": None},
               {"match": {"type": "Conv3d"}, "method": "st3"}, name="mine")
    with pytest.warns(UserWarning) as record:
        m = sparsify.sparsify(net(), r, example_inputs=X, begin=0, end=0, fix=None)
    msgs = [str(w.message) for w in record]
    assert any("rule 1 of recipe 'mine' matched nothing ({'name': 'encoder.**'})" in s for s in msgs)
    assert any("rule 2 of recipe 'mine' matched nothing" in s for s in msgs)
    assert all("rule 0" not in s for s in msgs)
    assert isinstance(m.get_submodule("0"), SparseWeightMixin)
    plan = sparsify.plan(net(), r, example_inputs=X, begin=0, end=0, fix=None)
    assert plan.unmatched_rules == [1, 2]
    assert "warning: rule 1 matched nothing" in str(plan)
    assert plan.to_dict()["unmatched_rules"] == [1, 2]


def test_optional_rule_matching_nothing_does_not_warn_but_is_in_plan():
    r = recipe(RULE, {"match": {"name": "encoder.**"}, "method": None, "optional": True}, name="mine")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sparsify.sparsify(net(), r, example_inputs=X, begin=0, end=0, fix=None)
    assert not [w for w in record if "matched nothing" in str(w.message)]
    plan = sparsify.plan(net(), r, example_inputs=X, begin=0, end=0, fix=None)
    assert plan.unmatched_rules == [1]
    # printed as a note: "warning:" made the built-in sas recipe's downsample rule look misconfigured
    assert "note: rule 1 (optional) matched nothing" in str(plan) and "warning: rule 1" not in str(plan)


# ---------------------------------------------------------------------------------------------
# models sparsify cannot take
# ---------------------------------------------------------------------------------------------

def test_not_a_module():
    with pytest.raises(TypeError, match="sparsify takes a torch.nn.Module, got str"):
        sparsify.sparsify("resnet18", "st3", total_steps=10)


def test_already_sparsified():
    m = sparsify.sparsify(net(), "st3", total_steps=10, example_inputs=X)
    for recipe_ in ("st3", "st3-sigma"):  # whatever the recipe, the model is the problem
        with pytest.raises(ValueError) as e:
            sparsify.sparsify(m, recipe_)
        msg = str(e.value)
        assert "already sparsified" in msg and "sparsify.finalize(model)" in msg
    # finalize gives plain modules that can be sparsified again
    again = sparsify.sparsify(sparsify.finalize(m), "st3", total_steps=10, example_inputs=X)
    assert isinstance(again.get_submodule("0"), SparseWeightMixin)


@pytest.mark.parametrize("call", ["sparsify", "plan"])
def test_uninitialized_lazy_layers_are_one_line(call):
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match=r"^the model has lazy layers without their shapes yet \(0: LazyConv2d and 1 "
                                         r"more\): run one forward \(model\(example_batch\)\) to initialize them"):
        getattr(sparsify, call)(model, "st3", total_steps=10)
    model(torch.randn(1, 3, 8, 8))  # initialized: fine
    assert isinstance(sparsify.sparsify(model, "st3", total_steps=10).get_submodule("3").weight, nn.Parameter)


def test_a_per_sample_loss_given_to_step_is_one_line():
    m = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "st3", total_steps=10)
    with pytest.raises(ValueError, match=r"^sparsify.step: loss is the step's training loss, one number; got a "
                                         r"tensor of shape \(3,\) \(per-sample losses\? pass loss.mean\(\)\)$"):
        sparsify.step(m, torch.ones(3))
    assert sparsify.step(m, torch.ones(())) == 1


def test_functions_need_a_sparsified_model():
    for fn in (sparsify.step, sparsify.penalty, sparsify.report, sparsify.finalize, sparsify.param_groups):
        with pytest.raises(TypeError, match=re.escape("call model = sparsify.sparsify(model, recipe) first")):
            fn(net())


def test_compiled_model():
    compiled = torch.compile(net())
    with pytest.raises(TypeError, match="torch.compile"):
        sparsify.sparsify(compiled, "st3", total_steps=10)


@pytest.fixture
def gloo_group(tmp_path):
    """A real single-process gloo group, so DistributedDataParallel can be built here."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_model_is_refused(gloo_group):
    wrapped = DDP(net())
    with pytest.raises(TypeError) as e:
        sparsify.sparsify(wrapped, "st3", total_steps=10)
    msg = str(e.value)
    assert "wrapped in DistributedDataParallel" in msg
    assert "DDP(sparsify.sparsify(model, recipe))" in msg
    with pytest.raises(TypeError, match="wrapped in DistributedDataParallel"):
        sparsify.plan(wrapped, "st3", total_steps=10)


def test_ddp_after_sparsify_works(gloo_group):
    """The documented order: sparsify, then wrap; every function sees through the wrapper."""
    m = sparsify.sparsify(net(), "st3", begin=0, end=2, fix=None, example_inputs=X)
    wrapped = DDP(m)
    opt = torch.optim.SGD(sparsify.param_groups(wrapped, 1e-4), lr=0.1)
    for _ in range(2):
        loss = F.cross_entropy(wrapped(torch.randn(2, 3, 6, 6)), torch.tensor([0, 1])) + sparsify.penalty(wrapped)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(wrapped)
    rep = sparsify.report(wrapped)
    assert rep.step == 2 and rep.totals["weight_sparsity"] == pytest.approx(0.9, abs=0.02)
    final = sparsify.finalize(wrapped)
    assert not any(isinstance(mod, SparseWeightMixin) for mod in final.modules())


# ---------------------------------------------------------------------------------------------
# untraceable parts
# ---------------------------------------------------------------------------------------------

class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing fails here."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.gate(x)
        return self.head(x.mean((2, 3)))


class UntraceableRoot(GatedNet):
    def forward(self, x):
        x = F.relu(self.stem(x))
        for _ in range(int(x.shape[0] > 0)):  # an int() of a proxy fails at the root
            x = self.gate(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("cls, where", [(GatedNet, "gate"), (UntraceableRoot, "<root>")])
def test_untraceable_submodule_falls_back_and_is_reported(cls, where):
    x = torch.randn(2, 3, 8, 8)
    model = cls()
    with pytest.warns(UserWarning, match="torch.fx could not trace .* the layers inside them are "
                                         "rewritten module by module; see sparsify.plan") as record:
        sparsify.sparsify(model, "activation-l1", total_steps=10, example_inputs=x, capture="fx")
    named = "the model root" if where == "<root>" else where
    (line,) = [str(w.message) for w in record if "could not trace" in str(w.message)]  # one line, not one per module
    assert f"({named}" in line
    # a recipe that only swaps Conv/Linear layers loses nothing there: the plan says it, no warning does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = sparsify.sparsify(model, "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x)
    # every conv, including those inside the untraceable part, is rewritten
    for name in ("stem", "gate.a", "gate.b", "head"):
        assert isinstance(m.get_submodule(name), SparseWeightMixin), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x)
    assert {e.name for e in plan.rewritten} == {"stem", "gate.a", "gate.b", "head"}
    fb = plan.fallbacks[0]
    assert (fb["name"] or "<root>") == where and "TraceError" in fb["reason"] or "Proxy" in fb["reason"]
    assert f"untraceable, kept as a leaf: {where}" in str(plan)
    # it trains and finalizes like any other model
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), m(x))
    final = sparsify.finalize(m)
    torch.testing.assert_close(final(-x), m(-x))  # the other branch of the gate


def test_untraceable_leaf_layers_reported_dense_when_excluded():
    r = recipe({"match": {"type": ["Conv2d", "Linear"]}, "method": "st3"},
               {"match": {"name": "gate.**"}, "method": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(GatedNet(), r, example_inputs=torch.randn(2, 3, 8, 8), begin=0, end=0, fix=None)
    dense = {e.name: e.reason for e in plan.dense}
    assert dense == {"gate.a": "excluded by rule 1", "gate.b": "excluded by rule 1"}


def test_finalize_without_example_inputs():
    m = sparsify.sparsify(net(), "st3", begin=0, end=0, fix=None)
    assert find_inputs(m) is None, "a 224x224 guess cannot fit the 6x6 model's Linear"
    with pytest.raises(sparsify.FinalizeError, match="needs example inputs"):
        sparsify.finalize(m)
    assert sparsify.finalize(m, X) is not None
    assert sparsify.finalize(m, check=False) is not None


def find_inputs(m):
    from sparsify.core.state import find_state
    return find_state(m).example_inputs


def test_checkpoint_from_another_recipe():
    a = sparsify.sparsify(net(), "st3", total_steps=10, example_inputs=X)
    b = sparsify.sparsify(net(), "st3", total_steps=20, example_inputs=X)
    with pytest.raises(RuntimeError, match=r"another sparsify\(\.\.\.\) call .*total_steps: 10 in the checkpoint, 20 here"):
        b.load_state_dict(a.state_dict())


def test_recipe_stored_in_model_and_report():
    m = sparsify.sparsify(net(), "st3", sparsity=0.8, total_steps=10, example_inputs=X)
    from sparsify.core.state import find_state
    stored = json.loads(find_state(m).recipe_json)
    assert stored["rules"][0]["params"]["sparsity"] == 0.8
    assert sparsify.report(m).recipe == "st3"


def test_dense_checkpoint_into_a_sparsified_model_says_what_to_do():
    dense = net()
    m = sparsify.sparsify(net(), "st3", total_steps=10, example_inputs=X)
    with pytest.raises(RuntimeError, match=r"holds no sparsify state.*strict=False"):
        m.load_state_dict(dense.state_dict())
    # strict=False takes the dense weights (the layers keep their names)
    result = m.load_state_dict(dense.state_dict(), strict=False)
    assert torch.equal(m.get_submodule("0").weight, dense[0].weight) and not result.unexpected_keys


def test_a_model_holding_a_sparsified_part_names_it():
    # sparsify(model.backbone) and then the whole model given to step / penalty / report / finalize
    model = nn.Sequential()
    model.add_module("backbone", sparsify.sparsify(net()[:2], "gmp", example_inputs=X, total_steps=10))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 2)))
    for call in (sparsify.step, sparsify.penalty, sparsify.report, sparsify.finalize):
        with pytest.raises(TypeError, match=r"holds models it made at `backbone`: pass each of those "
                                            r"\(sparsify\.step\(model\.backbone\)"):
            call(model)
    assert sparsify.step(model.backbone) == 1  # what it says works


def test_a_type_name_in_the_wrong_case_is_pointed_out():
    # "Conv2D" matched nothing and the CLI trained a dense model at exit 0 with only "matched nothing"
    rule = {"match": {"type": ["Conv2D"]}, "method": "magnitude", "params": {"sparsity": 0.5}}
    with pytest.warns(UserWarning, match=r"matched nothing \(\{'type': \['Conv2D'\]\}\) \(did you mean 'Conv2d'\?\)"):
        sparsify.sparsify(net(), recipe(rule), total_steps=10)
