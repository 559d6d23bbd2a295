"""Regression tests for passes/ edits, selection and inputs: rewrite primitives keep what they
do not set (kwargs, node meta, module paths), name globs match whole components only, keyword
example inputs bind to the forward's parameters, and a traced graph's CallGuard serves only the
calls (arguments, checkpointing mode) it was traced for."""
from __future__ import annotations

import typing

import pytest
import torch
import torch.fx as fx
from torch import nn

from passes import compile_glob, insert_after, insert_call, module_path_of, set_call
from passes.module_stack import enclosing_modules
from passes.call_inputs import positional_inputs
from passes.calls import CallGuard


# ---------------------------------------------------------------------------------------------
# passes/rewrite.py
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x).relu()


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = Block()

    def forward(self, x):
        return self.blk(x)


def first(gm, op):
    return next(n for n in gm.graph.nodes if n.op == op)


def test_set_call_keeps_the_keyword_arguments_it_does_not_set():
    """set_call(kwargs={"inplace": False}) on leaky_relu keeps its negative_slope."""
    gm = fx.symbolic_trace(lambda x: torch.nn.functional.leaky_relu(x, negative_slope=0.2, inplace=True))
    node = first(gm, "call_function")
    set_call(node, kwargs={"inplace": False})
    assert node.kwargs == {"negative_slope": 0.2, "inplace": False}
    gm.recompile()
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(gm(x), torch.tensor([-0.2, 2.0]))


def test_insert_call_takes_the_module_path_of_meta_from():
    """A node inserted with meta_from=relu sits in relu's module (what rules match against)."""
    gm = fx.symbolic_trace(Outer())
    relu = first(gm, "call_method")
    new, _ = insert_call(gm, relu, "call_function", torch.neg, (relu,), meta_from=relu)
    assert module_path_of(relu) == "blk"
    assert module_path_of(new) == "blk"


def test_insert_after_keeps_the_module_path_of_its_anchor():
    """A module inserted after blk.conv is inside blk, like the conv (what rules match against)."""
    gm = fx.symbolic_trace(Outer())
    conv = first(gm, "call_module")
    new, _ = insert_after(gm, conv, nn.Identity(), "blk.probe")
    assert module_path_of(new) == module_path_of(conv) == "blk.conv"
    assert "blk" in enclosing_modules(new)


# ---------------------------------------------------------------------------------------------
# passes/select.py: globs
# ---------------------------------------------------------------------------------------------

def test_a_question_mark_glob_does_not_match_a_dot():
    """`?` matches one character within a name component, never the `.` between components."""
    glob = compile_glob("layer?conv")
    assert glob.fullmatch("layer1conv")
    assert not glob.fullmatch("layer.conv")


def test_a_full_name_glob_does_not_select_its_prefixes():
    """A rule naming layer1.0.conv1 does not select layer1 or layer1.0."""
    glob = compile_glob("layer1.0.conv1")
    assert glob.fullmatch("layer1.0.conv1")
    assert not glob.fullmatch("layer1")
    assert not glob.fullmatch("layer1.0")


# ---------------------------------------------------------------------------------------------
# passes/call_inputs.py: keyword example inputs
# ---------------------------------------------------------------------------------------------

class Defaults(nn.Module):
    def forward(self, x, scale=2.0, y=None):
        return x


class TwoRequired(nn.Module):
    def forward(self, a, b):
        return a


class Features(nn.Module):
    def forward(self, features: typing.Mapping[str, torch.Tensor]):
        return features


class Base(nn.Module):
    def forward(self, input_ids, attention_mask=None, labels=None):
        return input_ids


class PeftLike(nn.Module):
    """A PEFT wrapper: forward(*args, **kwargs) passed on to get_base_model()."""

    def __init__(self):
        super().__init__()
        self.base = Base()

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


def test_keyword_inputs_fill_skipped_parameters_with_their_defaults():
    """example_inputs {"x", "y"} pass scale at its default 2.0, not None."""
    assert positional_inputs(Defaults(), {"x": 1, "y": 3}) == (1, 2.0, 3)


def test_unknown_keys_for_two_required_parameters_are_refused():
    """A dict whose keys name no parameter of forward(a, b) raises ValueError."""
    with pytest.raises(ValueError):
        positional_inputs(TwoRequired(), {"foo": 1})


def test_a_mapping_annotated_parameter_takes_the_dict_whole():
    """forward(features: Mapping[str, Tensor]) gets the example dict itself."""
    inputs = {"pixel_values": 1}
    assert positional_inputs(Features(), inputs) == inputs


def test_a_peft_like_wrapper_binds_keywords_through_its_base_model():
    """Keyword inputs of a PEFT-like wrapper bind to its base model's parameters."""
    assert positional_inputs(PeftLike(), {"input_ids": 1, "labels": 2}) == (1, None, 2)


# ---------------------------------------------------------------------------------------------
# passes/calls.py: CallGuard
# ---------------------------------------------------------------------------------------------

class Switch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.grad_checkpointing = True

    def forward(self, x):
        return self.lin(x)


def test_a_checkpointing_switch_does_not_matter_under_no_grad():
    """A graph traced with checkpointing off serves a checkpointing module under no_grad, not with grads."""
    guard = CallGuard(Switch.forward, {}, modes={("", "grad_checkpointing"): False})
    m = Switch().train()
    with torch.no_grad():
        assert guard.off_mode(m) is None
    assert guard.off_mode(m) == ("", "grad_checkpointing")


def kwargs_forward(self, x, **kwargs):
    return x


def flag_forward(self, x, flag=True):
    return x


def test_a_call_missing_a_kwargs_key_the_trace_read_does_not_fit():
    """A graph traced with **kwargs key 'scale' does not serve a call without it."""
    guard = CallGuard(kwargs_forward, {}, var_keys=("scale",))
    assert guard.fits((1,), {"scale": 2})
    assert not guard.fits((1,), {})


def varargs_forward(self, x, *rest):
    return x


def test_an_extra_positional_argument_does_not_fit():
    """A graph of forward(x, *rest) traced with (x,) does not serve (x, y); (x, None) it does."""
    guard = CallGuard(varargs_forward, {})
    assert guard.fits((1,), {})
    assert not guard.fits((1, 2), {})
    assert guard.fits((1, None), {})


def star_forward(self, *inputs):
    x, y = inputs
    return x + y


def test_a_varargs_call_fits_with_the_traced_count_only():
    """A graph of forward(*inputs) traced with two inputs serves calls with two (or a None after
    them), not with one, three, or a None among the two."""
    guard = CallGuard(star_forward, {}, var_count=2)
    assert guard.fits((1, 2), {}) and guard.fits((1, 2, None), {})
    assert not guard.fits((1,), {}) and not guard.fits((1, 2, 3), {}) and not guard.fits((1, None), {})
    assert not CallGuard(star_forward, {}).fits((1, 2), {})  # a count not known: no call fits


def test_a_flag_traced_as_true_does_not_fit_one():
    """A graph traced for flag=True does not serve flag=1 (the forward may test `is True`)."""
    guard = CallGuard(flag_forward, {"flag": True})
    assert guard.fits((1,), {"flag": True})
    assert guard.fits((1,), {})
    assert not guard.fits((1,), {"flag": 1})
