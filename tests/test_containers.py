"""Models that are containers: sparsify attaches its state as a child module (``sparsify_state``,
so that ``state_dict`` and ``.to()`` carry it) and a rewrite adds the modules its graph calls.
Before, an ``nn.Sequential`` model counted both among its layers (``len(model)`` grew,
``model[-1]`` was the state, ``model[-1] = head`` overwrote it), and a model whose own forward
calls each child in turn (sentence-transformers' ``SentenceTransformer``) raised
NotImplementedError at its first forward: the state has no forward."""
from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import sparsify
from loops import run_steps

RECIPES = sorted(sparsify.builtin_recipes())


def _mlp():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_sequential_model_keeps_its_layers(recipe):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # semi-structured matches no Linear: said, expected
        m = sparsify.sparsify(_mlp(), recipe, total_steps=4, example_inputs=(x,))
    assert len(m) == 3
    assert [m[i] for i in range(3)] == list(m) == [m._modules[n] for n in ("0", "1", "2")]
    assert m[-1] is m._modules["2"] and isinstance(m[:2], nn.Sequential) and len(m[:2]) == 2
    if not recipe.startswith("sas"):  # SAS feeds its layer the relu's input: no longer a chain of the layers
        with torch.no_grad():
            torch.testing.assert_close(nn.Sequential(*m).eval()(x), m.eval()(x))


def test_a_sequential_models_head_can_be_replaced_by_index():
    m = sparsify.sparsify(_mlp(), "st3", total_steps=4)
    head = nn.Linear(8, 5)
    m[-1] = head
    assert m._modules["2"] is head and isinstance(m._modules["sparsify_state"], nn.Module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replaced head is dropped from the recipe's groups: said
        assert m(torch.randn(2, 8)).shape == (2, 5)


class Pool(nn.Module):
    def forward(self, features):
        features["embedding"] = features["tokens"].mean(1)
        return features


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.act, self.out = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, features):
        features["tokens"] = self.out(self.act(self.proj(features["input"])))
        return features


class Pipeline(nn.Sequential):
    """SentenceTransformer's shape: a Sequential whose own forward hands a dict from child to
    child, and calls each with the keywords its forward accepts."""

    def forward(self, features, **kwargs):
        for name, module in self.named_children():
            # the keywords a child takes (torch.fx cannot iterate **kwargs: this root runs eagerly)
            features = module(features, **{k: v for k, v in kwargs.items() if k in self.takes.get(name, ())})
        return features

    takes: dict = {}


@pytest.mark.parametrize("recipe", ["st3", "tl1", "dual", "nm-2-4"])
def test_a_model_that_calls_each_child_in_turn_runs_trains_and_finalizes(recipe):
    torch.manual_seed(0)

    def feats():
        return {"input": torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))}
    model = Pipeline(OrderedDict(encoder=Encoder(), pool=Pool()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, recipe, total_steps=3, example_inputs=(feats(),))
        assert sparsify.core.state.find_state(m).plan.rewritten
        opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
        run_steps(m, opt, [(feats(), None)] * 3, penalty=True, loss_of=lambda f, _: m(f)["embedding"].square().mean())
        m.eval()
        final = sparsify.finalize(m, (feats(),))
    with torch.no_grad():
        torch.testing.assert_close(final(feats())["embedding"], m(feats())["embedding"], rtol=1e-4, atol=1e-5)


class _Listed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.acts = nn.ModuleList([nn.ReLU(), nn.GELU()])

    def forward(self, x):
        for fc, act in zip(self.fc, self.acts):
            x = act(fc(x))
        return x


def test_a_module_inserted_after_an_element_of_a_module_list_stays_out_of_the_list():
    """tl1's regularizer after ``acts[0]`` was put in ``acts`` as ``0_tl1``: ``len(m.acts)`` grew,
    iterating it yielded the regularizers, ``m.acts[-1]`` raised KeyError."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    m = sparsify.sparsify(_Listed(), "tl1", total_steps=4, example_inputs=x)
    assert len(m.acts) == 2 and [type(a) for a in m.acts] == [nn.ReLU, nn.GELU] and isinstance(m.acts[-1], nn.GELU)
    assert {"acts_0_tl1", "acts_1_tl1"} <= {n for n, _ in m.named_modules()}
    m.train()(x).sum()
    assert float(sparsify.penalty(m).detach()) > 0.0  # the moved regularizers still run in the forward
    final = sparsify.finalize(m.eval())
    assert len(final.acts) == 2 and list(final.acts._modules) == ["0", "1"]


class _Features(nn.Module):
    """VGG's shape: ``features`` is a plain Sequential the model calls, and users call it too."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                                      nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("recipe", ["semi-structured", "tl1", "sas"])
def test_a_nested_sequential_called_on_its_own_runs_only_its_layers(recipe):
    """The modules a recipe inserted after ``features[0]`` / ``features[1]`` went into ``features``
    itself: called on its own (a user's feature extraction) it ran them after its last layer, where
    semi-structured's mask (made for features[0]'s 8x8 output) raised "run the model at the
    resolution its masks were made for" and tl1 recorded a penalty on the wrong activation."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(_Features(), recipe, total_steps=4, example_inputs=x)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    run_steps(m, opt, [(x, torch.tensor([0, 1]))] * 3, penalty=True)
    assert list(m.features._modules) == ["0", "1", "2", "3", "4"]
    with torch.no_grad():
        got, plain = m.features(x), x
        for layer in m.features:
            plain = layer(plain)
    torch.testing.assert_close(got, plain)
    if recipe == "tl1":
        m.train()
        sparsify.penalty(m)
        m.features(x)
        assert float(sparsify.penalty(m)) == 0.0  # no regularizer ran outside the model's forward
    if recipe == "semi-structured":
        inserted = {n: mod.layer for n, mod in m.named_modules() if n.endswith("_pmask")}
        assert inserted == {"features_0_pmask": "features.0", "features_2_pmask": "features.2"}


def test_a_checkpoint_with_masks_inside_a_nested_sequential_still_loads():
    """Masks inserted in a nested Sequential were saved as ``features.0_pmask.mask`` before they
    moved beside it: such a checkpoint loads under the new names, masks and all."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    a = sparsify.sparsify(_Features(), "semi-structured", total_steps=4, example_inputs=x)
    run_steps(a, torch.optim.SGD(a.parameters(), lr=0.01), [(x, torch.tensor([0, 1]))] * 4)
    saved = {k.replace("features_0_pmask", "features.0_pmask").replace("features_2_pmask", "features.2_pmask"): v
             for k, v in a.state_dict().items()}
    assert "features.0_pmask.mask" in saved and bool((saved["features.0_pmask.mask"] == 0).any())
    b = sparsify.sparsify(_Features(), "semi-structured", total_steps=4, example_inputs=x)
    b.load_state_dict(saved)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
