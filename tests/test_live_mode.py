"""``self.training`` read by a model's own forward keeps following ``train()`` / ``eval()`` after
sparsify, for every built-in recipe: a value read (``F.dropout(x, p, training=self.training)``)
stays a graph node, control flow on it (``if self.training:``) runs the module's own forward in
the mode the graph was not traced in."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.prepare.recipe import _recipe_dir

RECIPES = sorted(sparsify.builtin_recipes())
# parameters that make a recipe leave the outputs as they are at step 0 (SAS rewires its layers:
# its outputs differ by construction, only the mode behaviour is checked there)
IDENTITY = {"nm": {"begin": 10**6, "fix": None}, "str": {"s_init": -1e4}}


class Head(nn.Module):
    """A classifier head as transformers writes them: dropout switched by the module's mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.3, training=self.training))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.head = Head()

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.training:  # control flow on the mode, at the root
            h = h + 0.5
        h = F.relu(self.conv2(h)).mean((2, 3))
        return self.head(h)


def _identity_recipe(name):
    data = json.loads((_recipe_dir() / f"{name}.json").read_text())
    for rule in data["rules"]:
        rule.setdefault("params", {}).update(IDENTITY.get(rule.get("method"), {}))
    return data


def _run(model, x, mode, seed):
    getattr(model, mode)()
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("recipe", RECIPES)
def test_mode_stays_live(recipe):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(net, _identity_recipe(recipe), total_steps=1000, example_inputs=x)
    # eval: no dropout, no training branch; train: both, drawn from the same random numbers
    assert torch.equal(_run(m, x, "eval", 1), _run(m, x, "eval", 2))
    assert not torch.equal(_run(m, x, "train", 1), _run(m, x, "train", 2))
    if recipe.startswith("sas"):
        return
    for mode in ("eval", "train", "eval"):
        torch.testing.assert_close(_run(m, x, mode, 1), _run(net, x, mode, 1), rtol=0, atol=0)


def test_dropout_mode_is_a_graph_node():
    torch.manual_seed(0)
    m = sparsify.sparsify(Net(), "st3", total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    reads = [n.target for n in m.graph.nodes if n.op == "get_attr" and str(n.target).endswith("training")]
    assert reads == ["head.training"]
    assert m._call_guard.modes == {("", "training"): True}  # the root's `if self.training:` took the train branch
