"""Wrong arguments to the public functions: each is refused in one line that names the function,
the argument and what it takes (never an AttributeError from deep inside, never silently taken)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sparsify
from sparsify import RecipeError

X = torch.zeros(2, 8)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sparse() -> nn.Module:
    return sparsify.sparsify(mlp(), "st3", example_inputs=X, begin=0, end=2, fix=None)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


def rule(**kw) -> dict:
    return {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3", **kw}]}


# ---------------------------------------------------------------------------------------------
# param_groups
# ---------------------------------------------------------------------------------------------

def test_no_decay_string_is_one_suffix():
    m = sparse()
    groups = sparsify.param_groups(m, 0.1, no_decay="bias")
    plain = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(plain) == 1 and {id(p) for p in plain[0]["params"]} == {id(m[0].bias), id(m[2].bias)}


@pytest.mark.parametrize("kwargs, error, expected", [
    ({"no_decay": [1]}, TypeError, "no_decay must be a name suffix or a tuple of them"),
    ({"no_decay": 5}, TypeError, "no_decay must be a name suffix or a tuple of them"),
    ({"weight_decay": "a"}, TypeError, "weight_decay must be a number >= 0 or None, got str"),
    ({"weight_decay": True}, TypeError, "weight_decay must be a number >= 0 or None, got bool"),
    ({"weight_decay": -1}, ValueError, "weight_decay must be a finite number >= 0, got -1"),
    ({"weight_decay": float("nan")}, ValueError, "weight_decay must be a finite number >= 0, got nan"),
    # spread into every group, it replaced the group's parameters: an optimizer that trained nothing
    ({"params": []}, TypeError, "params= is no option (it fills each group's params from the model"),
])
def test_param_groups_bad_arguments(kwargs, error, expected):
    m = sparse()
    with pytest.raises(error) as e:
        sparsify.param_groups(m, **{"weight_decay": 0.1, **kwargs})
    assert one_line(e).startswith("sparsify.param_groups: ") and expected in str(e.value)


def test_param_groups_takes_numpy_weight_decay():
    groups = sparsify.param_groups(sparse(), np.float32(0.5))
    assert groups[0]["weight_decay"] == 0.5 and type(groups[0]["weight_decay"]) is float


# ---------------------------------------------------------------------------------------------
# what is passed as the model
# ---------------------------------------------------------------------------------------------

def _integrations():
    from sparsify.integrations import distributed
    out = [("state_fingerprint", distributed.state_fingerprint), ("fsdp_units", distributed.fsdp_units),
           ("assert_synchronized", distributed.assert_synchronized)]
    try:
        from sparsify.integrations import huggingface
        out.append(("linear_share", huggingface.linear_share))
    except ImportError:
        pass
    return out


CALLS = [(f"sparsify.{n}", getattr(sparsify, n)) for n in ("step", "penalty", "report", "param_groups", "finalize")]


@pytest.mark.parametrize("where, fn", CALLS + _integrations(), ids=lambda v: v if isinstance(v, str) else "")
def test_an_optimizer_for_the_model(where, fn):
    opt = torch.optim.SGD(sparse().parameters(), lr=0.1)
    with pytest.raises(TypeError) as e:
        fn(opt)
    assert one_line(e) == (f"{where}: model must be the nn.Module sparsify.sparsify returned, got SGD "
                           "(an optimizer: pass the model it trains)")


@pytest.mark.parametrize("value, shown", [
    (None, "None"), ("model", "str"), (iter([]), "list_iterator"),
    (list(nn.Linear(1, 1).parameters()), "list (model.parameters()? pass the model itself)"),
    ([nn.Linear(1, 1)], "list of modules (pass one model at a time)")],
    ids=["None", "str", "iter", "params", "modules"])
def test_other_non_modules(value, shown):
    with pytest.raises(TypeError) as e:
        sparsify.step(value)
    assert one_line(e) == f"sparsify.step: model must be the nn.Module sparsify.sparsify returned, got {shown}"


def test_parameters_for_the_model():
    with pytest.raises(TypeError) as e:
        sparsify.report(sparse().parameters())
    assert one_line(e).endswith("got generator (model.parameters()? pass the model itself)")


def test_assert_synchronized_refuses_none_without_a_process_group():
    from sparsify.integrations.distributed import assert_synchronized
    with pytest.raises(TypeError) as e:
        assert_synchronized(None)
    assert one_line(e).startswith("assert_synchronized: model must be the nn.Module")
    assert_synchronized(sparse())  # a sparsified model: a no-op on one process


@pytest.mark.parametrize("which", ["averaged", "model"])
def test_sync_either_argument(which):
    m = sparse()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError) as e:
        sparsify.sync(opt, m) if which == "averaged" else sparsify.sync(m, opt)
    assert one_line(e).startswith(f"sparsify.sync: {which} must be the nn.Module sparsify.sparsify returned, got SGD")


def test_finalized_model():
    m = sparse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(m)
    with pytest.raises(TypeError) as e:
        sparsify.step(final)
    assert "or it is sparsify.finalize's output (plain modules: nothing to step" in one_line(e)


@pytest.mark.parametrize("index", [0, 1])  # a sparse layer, a plain ReLU of the returned model
def test_a_layer_of_the_sparsified_model(index):
    m = sparse()
    with pytest.raises(TypeError) as e:
        sparsify.report(m[index])
    assert one_line(e) == (f"sparsify.report: model is a layer inside a sparsified model ({type(m[index]).__name__}), "
                           "not the model: pass the model sparsify.sparsify returned")


def test_the_model_given_to_sparsify():
    net = mlp()
    sparsify.sparsify(net, "st3", example_inputs=X, begin=0, end=2, fix=None)
    with pytest.raises(TypeError) as e:
        sparsify.penalty(net)
    assert one_line(e).startswith("sparsify.penalty: model is the model given to sparsify.sparsify, which returns "
                                  "a new module: pass the one it returned")


# ---------------------------------------------------------------------------------------------
# step's loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["1.0", [1.0], {"loss": 1.0}, nn.Linear(1, 1), True, torch.tensor(True)],
                         ids=["str", "list", "dict", "module", "bool", "bool-tensor"])
def test_step_loss_of_a_wrong_type(loss):
    with pytest.raises(TypeError) as e:
        sparsify.step(sparse(), loss)
    assert one_line(e).startswith("sparsify.step: loss must be a number or a one-element tensor, got ")


@pytest.mark.parametrize("loss", [1, 0.5, np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5])],
                         ids=["int", "float", "np.float32", "0-dim", "1-element"])
def test_step_loss_numbers(loss):
    assert sparsify.step(sparse(), loss) == 1


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

def test_a_recipe_object_with_overrides_on_top():
    recipe = sparsify.load_recipe("st3", sparsity=0.5)
    m = sparsify.sparsify(mlp(), recipe, total_steps=10, example_inputs=X)
    assert m.sparsify_state.recipe["rules"][0]["params"]["sparsity"] == 0.5
    m = sparsify.sparsify(mlp(), recipe, total_steps=10, example_inputs=X, end=0.8)
    assert m.sparsify_state.recipe["rules"][0]["params"]["end"] == 0.8
    assert m.sparsify_state.recipe["rules"][0]["params"]["sparsity"] == 0.5
    assert sparsify.load_recipe(recipe).data == recipe.data


def test_a_recipe_of_another_type():
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(3)
    assert one_line(e) == ("a recipe is a built-in name, a path to a JSON file, or a dict (or the Recipe load_recipe "
                           "returns); got int")


@pytest.mark.parametrize("text", ['{"version": 1, "rules": []}', ' {"name": "a/b.json"}', "[]"])
def test_a_json_text(text):
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(text)
    assert "is a JSON text, not a recipe name or path: pass json.loads(text) (a dict) or the path" in one_line(e)


def test_params_on_a_null_method_rule():
    recipe = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": None, "params": {"foo": 0.5}}]}
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe(recipe)
    assert one_line(e).startswith('<dict>: $.rules[0].params: a rule with "method": null leaves the layers it '
                                  "matches dense and takes no params")


@pytest.mark.parametrize("key, value, expected", [
    ("type", 3, "a module class name (Conv2d) or a list of class names, got 3"),
    ("type", [3], "a module class name (Conv2d) or a list of class names, got [3]"),
    ("op", 3, "a functional op name (relu) or a list of op names, got 3"),
    ("name", {}, "a qualified-name glob (layer1.*) or a list of globs, got {}"),
])
def test_match_names_of_a_wrong_type(key, value, expected):
    pytest.importorskip("jsonschema")
    with pytest.raises(RecipeError) as e:
        sparsify.load_recipe({"version": 1, "rules": [{"match": {key: value}, "method": "st3"}]})
    assert one_line(e) == f"<dict>: invalid recipe: $.rules[0].match.{key}: must be {expected}"


@pytest.mark.parametrize("typo, meant", [("example_input", "example_inputs"), ("total_step", "total_steps"),
                                         ("sparsty", "sparsity")])
def test_misspelt_keywords(typo, meant):
    with pytest.raises(RecipeError) as e:
        sparsify.sparsify(mlp(), "st3", **{typo: 10})
    assert f"override {typo!r} is not a parameter of this recipe (built-in:st3): did you mean {meant}? " \
           "Its parameters: begin, end, fix" in one_line(e)


@pytest.mark.parametrize("key", ["inplace", "copy"])
def test_plan_takes_no_inplace_or_copy(key):
    with pytest.raises(TypeError) as e:
        sparsify.plan(mlp(), "st3", total_steps=10, **{key: True})
    assert one_line(e).startswith(f"sparsify.plan takes no {key}= (a dry run never modifies or copies the model)")


# ---------------------------------------------------------------------------------------------
# numbers of other kinds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total", [np.int64(10), np.int32(10), torch.tensor(10)], ids=["int64", "int32", "tensor"])
def test_total_steps_numpy_and_tensor_integers(total):
    m = sparsify.sparsify(mlp(), "st3", total_steps=total, example_inputs=X)
    assert type(m.sparsify_state.total_steps) is int and m.sparsify_state.total_steps == 10
    assert len(sparsify.plan(mlp(), "st3", total_steps=total, example_inputs=X).rewritten) == 2


@pytest.mark.parametrize("total, shown", [(10 ** 30, "an integer of 100 bits"), (2 ** 62, "an integer of 63 bits"),
                                          (2.5, "2.5"), (0, "0"), (True, "True"),
                                          (torch.tensor(2.5), "tensor(2.5000)")])
def test_total_steps_refused(total, shown):
    with pytest.raises(ValueError) as e:
        sparsify.sparsify(mlp(), "st3", total_steps=total)
    assert one_line(e) == ("total_steps must be a positive number of optimizer steps (an integer below 2**62), "
                           f"got {shown}")


@pytest.mark.parametrize("key, value, stored", [("end", np.int64(5), 5), ("sparsity", np.float32(0.5), 0.5),
                                                ("sparsity", np.float64(0.5), 0.5), ("end", torch.tensor(5), 5)])
def test_numpy_and_tensor_overrides(key, value, stored):
    m = sparsify.sparsify(mlp(), "st3", total_steps=10, example_inputs=X, **{key: value})
    got = m.sparsify_state.recipe["rules"][0]["params"][key]
    assert got == stored and type(got) is type(stored)


def test_numpy_numbers_in_a_dict_recipe():
    r = sparsify.load_recipe(rule(params={"sparsity": np.float32(0.5), "end": np.int64(3)}))
    assert r.rules[0].params["sparsity"] == 0.5 and type(r.rules[0].params["end"]) is int


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, error, expected", [
    (("st4",), {"attr": "net"}, RecipeError, "unknown recipe 'st4'"),
    (("st3",), {"attr": 3}, TypeError, "SparsifyCallback: attr must be the name of the LightningModule attribute "
                                       "to sparsify (a str such as 'net'), got 3"),
    (("st3",), {"attr": "net", "sparsty": 0.5}, RecipeError, "did you mean sparsity?"),
    (("st3",), {"attr": "net", "total_steps": -1}, ValueError, "total_steps must be a positive number"),
    (("st3",), {"attr": "net", "capture": "onnx"}, ValueError, "capture='onnx' is not a capture mode"),
    ((), {"sparsity": 0.5}, TypeError, "SparsifyCallback: sparsity given without recipe and attr"),
])
def test_lightning_callback_checks_its_arguments_when_made(args, kwargs, error, expected):
    lightning = pytest.importorskip("sparsify.integrations.lightning")
    with pytest.raises(error) as e:
        lightning.SparsifyCallback(*args, **kwargs)
    assert expected in one_line(e)


def test_lightning_callback_names_a_missing_attribute():
    lightning = pytest.importorskip("sparsify.integrations.lightning")
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.lr = 0.1

    callback = lightning.SparsifyCallback("st3", attr="nett", example_inputs=X)
    with pytest.raises(AttributeError) as e:
        callback.setup(None, LM(), "fit")  # before anything reads the trainer
    assert one_line(e) == "SparsifyCallback(attr='nett'): LM has no attribute 'nett'; did you mean 'net'?"
    with pytest.raises(TypeError) as e:
        lightning.SparsifyCallback("st3", attr="lr").setup(None, LM(), "fit")
    assert one_line(e) == ("SparsifyCallback(attr='lr'): LM.lr is float, not the nn.Module to sparsify (build it in "
                           "__init__ or in configure_model)")
    with pytest.raises(TypeError) as e:
        lightning.sparsified_modules(None)
    assert one_line(e).startswith("sparsified_modules: module must be an nn.Module")



def test_l1_prune_without_an_end_is_a_recipe_error_with_its_path():
    """The group raised a plain ValueError with no $.rules path when the recipe was built."""
    rule = {"match": {"type": "Linear"}, "method": "l1-prune"}
    with pytest.raises(sparsify.RecipeError) as e:
        sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), {"version": 1, "rules": [rule]}, total_steps=10)
    assert "$.rules[0].params.prune_at: is a fraction of the active range, which has no end" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), {"version": 1, "rules": [{**rule, "params": {"prune_at": 0}}]},
                      total_steps=10)


@pytest.mark.parametrize("recipe", ["st3", "str", "gmp"])
def test_param_groups_without_weight_decay_leave_the_optimizers_own(recipe):
    """SGD(param_groups(model), lr, weight_decay=5e-4), the natural edit of SGD(model.parameters(),
    ...), trained with no decay at all: every group said 0."""
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), recipe, total_steps=10)
    opt = torch.optim.SGD(sparsify.param_groups(m, no_decay="bias"), lr=0.1, weight_decay=5e-4)
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        assert by_param[id(p)] == (0.0 if name.endswith("bias") else 5e-4), name
    assert {g["weight_decay"] for g in torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.1).param_groups} == {1e-4}


@pytest.mark.parametrize("key", ["inplace", "copy"])
def test_inplace_and_copy_take_a_bool(key):
    with pytest.raises(TypeError, match=f"sparsify: {key} must be True or False, got str 'yes'"):
        sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", total_steps=10, **{key: "yes"})
