"""The recipe is validated whole before the model is touched, and a failed sparsify leaves the
caller's model exactly as it was (issue 13's defects, one test each)."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st

import sparsify
from sparsify import RecipeError, ScheduleError
from sparsify.methods import get_method
from passes import compile_glob

CONV = {"type": "Conv2d"}


def recipe(*rules, **top):
    return {"version": 1, "rules": list(rules) or [{"match": CONV, "method": "st3"}], **top}


def _message(spec, **kw):
    with pytest.raises(ValueError) as e:
        sparsify.load_recipe(spec, **kw)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# every block has a schema
# ---------------------------------------------------------------------------------------------

@pytest.mark.jsonschema
@pytest.mark.parametrize("top, path", [
    ({"schedule": {"ned": 0.5}}, "$.schedule.ned"),
    ({"options": {"trian": {}}}, "$.options.trian"),
    ({"options": {"train": {"learning_rate": 0.1}}}, "$.options.train.learning_rate"),
])
def test_typo_in_schedule_or_options_names_its_path(top, path):
    msg = _message(recipe(**top))
    assert f"{path}: unknown key {path.rsplit('.', 1)[1]!r}" in msg


@pytest.mark.jsonschema
def test_schedule_and_options_values_are_typed():
    assert "$.schedule.end" in _message(recipe(schedule={"end": "late"}))
    assert "$.schedule.begin" in _message(recipe(schedule={"begin": -1}))
    assert "$.options.train.optimizer" in _message(recipe(options={"train": {"optimizer": "lion"}}))
    assert "$.options.train.lr" in _message(recipe(options={"train": {"lr": 0}}))
    sparsify.load_recipe(recipe(schedule={"begin": 0, "end": 10, "fix": None},
                                options={"train": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0}}))


# ---------------------------------------------------------------------------------------------
# finite numbers, duplicate keys
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rule, key", [
    ({"match": {"type": "ReLU"}, "method": "tl1", "params": {}}, "lam"),
    ({"match": {"type": "ReLU"}, "method": "tl1", "params": {}}, "a"),
    ({"match": CONV, "method": "l1-prune", "params": {}}, "threshold"),
    ({"match": CONV, "method": "st3", "params": {}}, "sparsity"),
    ({"match": CONV, "method": "st3", "params": {}}, "end"),
    ({"match": CONV, "method": "str", "params": {}}, "s_init"),
])
def test_non_finite_params_are_rejected(rule, key, bad):
    rule = {**rule, "params": {key: bad}}
    assert f"$.rules[0].params.{key}: must be a finite number" in _message(recipe(rule))


def test_non_finite_in_times_stages_and_overrides():
    assert "$.schedule.end: must be a finite number" in _message(recipe(schedule={"end": float("inf")}))
    stages = [{"name": "a", "begin": 0, "end": float("nan")}]
    assert "$.stages[0].end: must be a finite number" in _message(recipe(stages=stages))
    msg = _message("tl1", lam=float("nan"))
    assert "$.rules[0].params.lam: must be a finite number" in msg and "overrides" in msg


def test_nan_and_infinity_literals_in_a_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"version": 1, "rules": [{"match": {"type": "ReLU"}, "method": "tl1", '
                    '"params": {"lam": NaN, "a": Infinity}}]}')
    msg = _message(str(path))
    assert "$.rules[0].params.a: must be a finite number, got inf" in msg
    assert "$.rules[0].params.lam: must be a finite number, got nan" in msg


def test_duplicate_keys_in_a_file_name_their_path(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3",\n'
                    '  "params": {"sparsity": 0.5, "sparsity": 0.9}}]}')
    msg = _message(str(path))
    assert f"{path}: invalid recipe" in msg
    assert "$.rules[0].params.sparsity: duplicate key 'sparsity'" in msg
    path.write_text('{"version": 1, "version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3"}]}')
    assert "$.version: duplicate key" in _message(str(path))


# ---------------------------------------------------------------------------------------------
# times and their order, checked up front
# ---------------------------------------------------------------------------------------------

def test_time_order_is_checked_before_the_model_is_touched():
    model = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.end: end (5) is before begin (10)")):
        sparsify.sparsify(model, "st3", begin=10, end=5, fix=None, inplace=True)
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.fix: fix (0.2 = step 20) is before end (0.5 = step 50) "
                                                      "(fix from the call's overrides)")):
        sparsify.sparsify(model, "gmp", fix=0.2, total_steps=100)
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.fix: fix (3) is before begin (5)")):
        sparsify.sparsify(model, "st3", begin=5, end=10, fix=3)
    # ST-3 may fix before its ramp ends, as the official code does (the fix applies the final ratio)
    sparsify.plan(model, "st3", begin=5, end=10, fix=8)
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.fix: fix (3) is before begin (5)")):
        sparsify.sparsify(model, "nm-2-4", begin=5, fix=3)
    with pytest.raises(ScheduleError, match=re.escape("$.rules[0].params.begin=0.05 is a fraction")):
        sparsify.sparsify(model, "st3")


def test_fractions_are_ordered_without_total_steps():
    # plan has no run length; two fractions still order the same whatever it will be
    model = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.end: end (0.1) is before begin (0.9)")):
        sparsify.plan(model, "st3", begin=0.9, end=0.1)
    with pytest.raises(RecipeError, match=re.escape("$.stages[0].end: end (0.2) is before begin (0.5)")):
        sparsify.plan(model, recipe({"match": CONV, "method": "l1-prune", "params": {"stage": "w"}},
                                    stages=[{"name": "w", "begin": 0.5, "end": 0.2}]))
    sparsify.plan(model, "st3", begin=0.1, end=0.9)  # a fraction and a step: ordered once resolved
    sparsify.plan(model, "st3", begin=10, end=0.5)


def test_an_unknown_stage_says_whether_the_stages_block_is_empty_or_absent():
    rule = {"match": {"type": "Linear"}, "method": "l1-prune", "params": {"stage": "w"}}
    for stages, said in (([], "the recipe's stages block is empty"), (None, "the recipe's stages: none (the recipe "
                                                                           "has no stages block)")):
        spec = recipe(rule) if stages is None else recipe(rule, stages=stages)
        with pytest.raises(RecipeError, match=re.escape(f"$.rules[0].params.stage: unknown stage 'w'; {said}")):
            sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), spec, total_steps=10)


def test_stages_are_checked_up_front():
    rule = {"match": CONV, "method": "l1-prune", "params": {"stage": "w"}}
    bad_end = [{"name": "w", "begin": 10, "end": 5}]
    with pytest.raises(RecipeError, match=re.escape("$.stages[0].end: end (5) is before begin (10)")):
        sparsify.sparsify(torchvision.models.resnet18(), recipe(rule, stages=bad_end), total_steps=100)
    unordered = [{"name": "w", "begin": 0.5, "end": None}, {"name": "v", "begin": 0.1, "end": 0.5}]
    with pytest.raises(RecipeError, match=re.escape("$.stages[1].begin: stages are listed in the order")):
        sparsify.sparsify(torchvision.models.resnet18(), recipe(rule, stages=unordered), total_steps=100)
    with pytest.raises(RecipeError, match=re.escape("$.rules[0].params.stage: unknown stage 'w'; the recipe's "
                                                    "stages: 'v'")):
        sparsify.sparsify(torchvision.models.resnet18(), recipe(rule, stages=[{"name": "v", "begin": 0}]))
    twice = [{"name": "w", "begin": 0}, {"name": "w", "begin": 1}]
    with pytest.raises(RecipeError, match=re.escape("$.stages[1].name: stage 'w' is defined twice")):
        sparsify.sparsify(torchvision.models.resnet18(), recipe(rule, stages=twice))


def test_plan_without_total_steps_checks_what_it_can():
    assert sparsify.plan(torchvision.models.resnet18(), "st3").rewritten  # fractions: unresolved, fine
    with pytest.raises(RecipeError, match=re.escape("end (5) is before begin (10)")):
        sparsify.plan(torchvision.models.resnet18(), "st3", begin=10, end=5, fix=None)


# ---------------------------------------------------------------------------------------------
# globs in linear time
# ---------------------------------------------------------------------------------------------

def test_glob_with_many_stars_on_a_long_name():
    name = "a" * 3000
    # a backtracking regex ([^.]*a)*...b takes exponential time to say no here
    assert compile_glob("*a" * 40 + "b").fullmatch(name) is False
    assert compile_glob("*a" * 40).fullmatch(name) is True
    assert compile_glob("**a" * 40 + "*").fullmatch(name + ".x" * 50) is False  # the last * cannot cross a dot
    assert compile_glob("**a" * 40 + "**").fullmatch(name + ".x" * 50) is True


@settings(max_examples=200, deadline=None)
@given(pattern=st.text("ab.*?", max_size=8), name=st.text("ab.", max_size=8))
def test_glob_agrees_with_a_regex_translation(pattern, name):
    """The linear-time glob says what a regex says (a whole-component ``**.``: zero or more components)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            whole = pattern.startswith(".", i + 2) and (i == 0 or pattern[i - 1] == ".")
            out.append(r"(?:.*\.)?" if whole else ".*")
            i += 3 if whole else 2
        else:
            out.append({"*": "[^.]*", "?": "[^.]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    assert compile_glob(pattern).fullmatch(name) == bool(re.fullmatch("".join(out), name, re.S))


# ---------------------------------------------------------------------------------------------
# a failed sparsify leaves the caller's model as it was
# ---------------------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


def _fingerprint(model):
    return {
        "modules": [(n, id(m), type(m), tuple(sorted(k for k, v in vars(m).items() if not k.startswith("_"))),
                     getattr(m, "inplace", None), m.training) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "keys": list(model.state_dict()),
    }


def _same(a, b):
    assert a["modules"] == b["modules"]
    assert a["params"] == b["params"]
    assert a["keys"] == b["keys"]
    assert all(torch.equal(a["values"][k], b["values"][k]) for k in a["keys"])


class Boom(RuntimeError):
    pass


def _raise_after_first(method_name, monkeypatch):
    """Make ``method_name``'s apply raise on its second site, after rewriting the first."""
    method = get_method(method_name)
    original = method.apply
    calls = []

    def apply(site, params):
        calls.append(site.name)
        if len(calls) > 1:
            raise Boom(f"injected while rewriting {site.name}")
        return original(site, params)

    monkeypatch.setattr(method, "apply", apply)


def _raise_in_group(method_name, monkeypatch):
    """Make the group constructor raise: every site is rewritten by then."""
    def make_group(*a, **k):
        raise Boom("injected in make_group")

    monkeypatch.setattr(get_method(method_name), "make_group", make_group)


def _raise_in_accepts(method_name, monkeypatch):
    def accepts(site):
        raise Boom("injected in accepts")

    monkeypatch.setattr(get_method(method_name), "accepts", accepts)


FAILURES = [
    ("st3", dict(begin=10, end=5, fix=None), None, RecipeError),
    ("st3", dict(sparsity=1.5, total_steps=10), None, RecipeError),
    ("tl1", dict(lam=-1.0), None, RecipeError),
    ("st3", dict(total_steps=10), _raise_after_first, Boom),
    ("tl1", dict(), _raise_after_first, Boom),
    ("sas", dict(), _raise_after_first, Boom),
    ("st3", dict(total_steps=10), _raise_in_group, Boom),
    ("tl1", dict(), _raise_in_group, Boom),
    ("gmp", dict(total_steps=10), _raise_in_accepts, Boom),
]


CASES = [(f, mode) for f in FAILURES for mode in (("inplace",) if f[2] is None else ("share", "inplace"))]
CASES.append((FAILURES[3], "copy"))


@pytest.mark.parametrize("failure, mode", CASES)
def test_failed_sparsify_leaves_the_model_as_it_was(failure, mode, monkeypatch):
    name, kwargs, inject, error = failure
    model = _model()
    before = _fingerprint(model)
    if inject is not None:
        inject({"gmp": "magnitude"}.get(name, name), monkeypatch)
    with pytest.raises(error):
        sparsify.sparsify(model, name, example_inputs=torch.randn(2, 3, 32, 32),
                          **({mode: True} if mode != "share" else {}), **kwargs)
    _same(before, _fingerprint(model))
    if mode == "inplace" and inject is not None:
        monkeypatch.undo()
        # nothing half-converted is left behind: the same model can be sparsified in place now
        m = sparsify.sparsify(model, name, inplace=True, **{"total_steps": 10, **kwargs})
        assert any(isinstance(mod, sparsify.methods.SparseWeightMixin) or "regular" in type(mod).__name__.lower()
                   for mod in model.modules()) and sparsify.report(m) is not None


def test_a_recipe_file_round_trips_through_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe(schedule={"begin": 0, "end": 10, "fix": 20})))
    assert sparsify.load_recipe(str(path)).rules[0].params["fix"] == 20


# ---------------------------------------------------------------------------------------------
# typed params and the generated schema
# ---------------------------------------------------------------------------------------------

def test_shipped_schema_is_the_generated_one():
    from sparsify.prepare.schema import generated_schema, schema_path
    shipped = json.loads(schema_path().read_text())
    assert shipped == generated_schema(shipped), "run: python -m sparsify.prepare.schema"


@pytest.mark.jsonschema
def test_schema_gives_editors_each_methods_params():
    import jsonschema
    from sparsify.prepare.schema import schema_path
    from sparsify.methods import REGISTRY
    schema = json.loads(schema_path().read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for name, method in REGISTRY.items():
        props = schema["$defs"][f"params_{name}"]["properties"]
        assert set(props) == set(method.params)
        assert all(p["description"] for p in props.values())
    bad = recipe({"match": CONV, "method": "st3", "params": {"sparsty": 0.5}})
    assert any("sparsty" in e.message for e in validator.iter_errors(bad))
    bad = recipe({"match": CONV, "method": "magnitude", "params": {"scope": "net"}})
    assert any(list(e.absolute_path) == ["rules", 0, "params", "scope"] for e in validator.iter_errors(bad))
    for name in sparsify.builtin_recipes():
        spec = json.loads((schema_path().parent / f"{name}.json").read_text())
        assert not list(validator.iter_errors(spec)), name


def test_every_method_documents_its_params():
    from sparsify.methods import REGISTRY
    for name, method in REGISTRY.items():
        doc = type(method).__doc__ or ""
        missing = [k for k in method.params if f"``{k}``" not in doc]
        assert not missing, f"{type(method).__name__}'s docstring does not list {missing}"


@pytest.mark.parametrize("method, key, bad, says", [
    ("st3", "sigma", 1, "must be true or false, got 1"),
    ("nm", "n", 2.0, "must be an integer >= 1, got 2.0"),
    ("nm", "n", True, "must be an integer >= 1, got True"),
    ("magnitude", "block", [4, 0], "must be null or [rows, cols] of positive integers, got [4, 0]"),
    ("magnitude", "block", [4, "a"], "must be null or [rows, cols] of positive integers, got [4, 'a']"),  # once
    ("magnitude", "scope", "net", "must be one of 'global', 'layer', got 'net'"),
    ("sas", "slot_options", [], "must be an object, got []"),
    ("semi-structured", "seed", 0.5, "must be an integer, got 0.5"),
    ("l1-prune", "prune_at", 1.5, "must be a fraction in [0, 1] of the stage, got 1.5"),
    ("tl1", "placement", "mid", "must be 'post' (the node's output) or 'pre' (its input), got 'mid'"),
])
def test_typed_params(method, key, bad, says):
    msg = _message(recipe({"match": CONV, "method": method, "params": {key: bad}}))
    assert f"$.rules[0].params.{key}: {says}" in msg


def test_a_list_params_type_reads_plainly():
    """It read "must be a list of  integers" (the article cut at a fixed width)."""
    from dataclasses import dataclass

    from sparsify.core.params import Params, param

    @dataclass
    class Sizes(Params):
        sizes: list[int] = param([1], "Sizes.")
        ratios: list[float] = param([0.5], "Ratios.")
    assert Sizes.problems({"sizes": ["a"], "ratios": [None]}) == [
        ("sizes", "must be a list of integers, got ['a']"), ("ratios", "must be a list of numbers, got [None]")]


def test_without_jsonschema_one_warning_per_process(no_jsonschema, recwarn):
    # every recipe goes unchecked the same way: one warning, not one per recipe loaded
    for name in ("st3", "gmp", "tl1"):
        sparsify.load_recipe(name)
    said = [w for w in recwarn.list if "jsonschema is not installed" in str(w.message)]
    assert len(said) == 1 and "recipes are not checked against recipe.schema.json" in str(said[0].message)


def test_one_problem_is_one_line_and_several_are_listed():
    one = _message({"version": 1, "name": "e", "rules": []})
    assert one == "<dict>: invalid recipe: $.rules: [] should be non-empty"
    several = _message({"version": 1, "rules": [{"match": {"typ": "Conv2d"}, "method": "st3", "extra": 1}]})
    assert several.count("\n") == 2 and several.startswith("<dict>: invalid recipe:\n  $.rules[0]")
