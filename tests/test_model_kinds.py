"""Models sparsify refuses for what they are (sparsify.prepare.model_kinds): each was taken before
and came back wrong without a word.

* a model holding its own ``sparsify_state``: its layer was overwritten by the state (whose forward
  is the identity), so a model ending in a ``sparsify_state`` head returned its hidden features; a
  plain attribute of that name gave torch's bare ``KeyError``;
* an ``nn.ModuleList`` root: the state became one of its elements (``len`` 2 -> 3, iteration
  yielded it, ``s[-1]`` raised ``KeyError``, ``append`` landed at index 3);
* a model that is one ``nn.Linear`` / ``nn.Conv2d``: its rule "matched nothing", the layer stayed
  dense, and the plan advised wrapping the Linear "in an nn.Linear".
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsify


class _OwnStateHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.sparsify_state = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.sparsify_state(torch.relu(self.fc(x)))


class _OwnStateValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.sparsify_state = nn.Linear(8, 8), {"epoch": 3}

    def forward(self, x):
        return self.fc(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _OwnStateHead()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("call", ["sparsify", "plan"])
@pytest.mark.parametrize("make, where, held", [
    (_OwnStateHead, "`sparsify_state`", "a submodule, Linear"),
    (_OwnStateValue, "`sparsify_state`", "an attribute"),
    (_Outer, "`body.sparsify_state`", "a submodule, Linear"),  # checkpoint tools drop every key under the name
])
def test_a_model_with_its_own_sparsify_state_is_refused_by_name(call, make, where, held):
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as e:
        getattr(sparsify, call)(model, "st3", total_steps=4, example_inputs=torch.randn(3, 8))
    msg = str(e.value)
    assert "\n" not in msg and msg == (f"the model has its own {where} ({held}): sparsify keeps its state under "
                                       "that name; rename it")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("container", [nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)]),
                                       nn.ModuleDict({"a": nn.Linear(3, 3)})])
def test_a_module_list_or_dict_root_is_refused_and_left_as_it_was(container):
    kind = type(container).__name__
    with pytest.raises(TypeError, match=rf"^the model is an nn\.{kind} \({kind}\): the state sparsify adds as a "
                                        r"child would become one of its elements; sparsify the module whose "
                                        r"forward runs it"):
        sparsify.sparsify(container, "st3", total_steps=4, inplace=True)
    assert len(container) == (2 if kind == "ModuleList" else 1) and "sparsify_state" not in container._modules


@pytest.mark.parametrize("call", ["sparsify", "plan"])
@pytest.mark.parametrize("layer", [nn.Linear(64, 64), nn.Conv2d(3, 8, 3)])
def test_a_single_layer_model_is_refused_with_the_wrap_that_works(call, layer):
    kind = type(layer).__name__
    with pytest.raises(TypeError, match=rf"^the model is a single {kind} layer: sparsify rewrites the layers a model "
                                        r"holds and adds its state beside them; wrap it: "
                                        r"sparsify\.sparsify\(nn\.Sequential\(layer\), \.\.\.\)$"):
        getattr(sparsify, call)(layer, "gmp", total_steps=4, begin=0, end=0)
    # the wrap the message names sparsifies it
    m = sparsify.sparsify(nn.Sequential(layer), "gmp", total_steps=4, begin=0, end=0)
    assert float((m[0].weight * m[0].mask == 0).float().mean()) > 0.5
