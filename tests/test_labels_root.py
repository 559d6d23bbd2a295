"""A model whose forward takes labels (transformers' heads: ``model(pixel_values=x, labels=y)`` in
training, ``model(pixel_values=x)`` in inference) runs the recipe in both calls. Its root used to
be traced whole for one of them (the example call's), and the other ran the root's own forward
without the inserted nodes: a tl1 penalty of 0 in every labelled training step, SAS trained on
ReLU'd inputs while deployed rewired, semi-structured's masks applied in eval only. Such a root now
runs its own forward (the loss around its children's calls) and its children are traced."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 2])
RECIPES = ["tl1", "sas", "semi-structured", "st3"]


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 1).flatten(1)


class Classifier(nn.Module):
    """What a transformers head looks like: the loss only when labels are given."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = Backbone(), nn.Sequential(nn.Linear(8, 3))

    def forward(self, pixel_values, labels=None, return_dict=None):
        logits = self.head(self.backbone(pixel_values))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _hf_resnet():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3))


MODELS = {"classifier": Classifier, "hf-resnet": _hf_resnet}
EXAMPLES = {"dict": {"pixel_values": X}, "with-labels": {"pixel_values": X, "labels": Y}, "none": None}


def _out(out, key):
    return out[key] if isinstance(out, dict) else getattr(out, key)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_labelled_and_unlabelled_calls_run_the_recipe(model, recipe, example):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(MODELS[model](), recipe, total_steps=6, example_inputs=EXAMPLES[example])
        opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.05)
        for _ in range(3):
            loss = _out(m(pixel_values=X, labels=Y), "loss")
            penalty = sparsify.penalty(m)
            opt.zero_grad()
            (loss + penalty).backward()
            opt.step()
            sparsify.step(m, loss=loss)
        if recipe == "tl1":
            assert float(penalty) > 0  # the regularizer nodes ran in the labelled training call
        with torch.no_grad():
            for mode in (m.train, m.eval):  # the same function with and without labels, in either mode
                mode()
                labelled = _out(m(pixel_values=X, labels=Y), "logits")
                sparsify.penalty(m)
                torch.testing.assert_close(labelled, _out(m(pixel_values=X), "logits"), rtol=0, atol=0)
                sparsify.penalty(m)
            deployed = sparsify.finalize(m, example_inputs=EXAMPLES["dict"])
            torch.testing.assert_close(_out(deployed(pixel_values=X), "logits"), _out(m(pixel_values=X), "logits"))
    # without example inputs the root and some children are untraceable (labels are proxies there),
    # said; with them the root is not "untraceable"; no call skips inserted nodes
    said = [str(w.message) for w in caught if ("the model root" in str(w.message) and example != "none")
            or "called with" in str(w.message) or "no forward with gradients" in str(w.message)]
    assert said == [], said
    assert "children traced: <root>: its forward takes labels" in str(sparsify.plan(MODELS[model](), recipe,
                                                                                    example_inputs=EXAMPLES["dict"]))


class OwnCode(nn.Module):
    """A root whose own code holds activations: its graph is the only place to insert after them."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, pixel_values, labels=None):
        logits = self.fc(F.relu(self.conv(pixel_values)).mean((2, 3)))
        return {"logits": logits, "loss": None if labels is None else F.cross_entropy(logits, labels)}


def test_a_root_whose_own_code_holds_needed_sites_stays_one_graph():
    """Split, it would lose the relu in its own code (tl1 inserts after it); kept whole, the call
    its graph was not traced for says that it skips the inserted nodes. A weight recipe, which
    swaps the layers module for module, splits it."""
    assert "children traced" not in str(sparsify.plan(OwnCode(), "tl1", example_inputs=EXAMPLES["dict"]))
    assert "children traced: <root>" in str(sparsify.plan(OwnCode(), "st3", example_inputs=EXAMPLES["dict"]))
    m = sparsify.sparsify(OwnCode(), "tl1", total_steps=4, example_inputs=EXAMPLES["dict"])
    with pytest.warns(UserWarning, match="called with arguments its graph was not traced for"):
        m(pixel_values=X, labels=Y)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_plan_does_not_call_a_root_kept_for_its_labels_untraceable(model):
    """Such a root is kept by choice, not because it cannot be traced: its layers that no rule
    matched (tl1 takes activations) read "no rule matched", not "... (inside an untraceable
    submodule)", both inside its traced children and in a child with nothing to trace."""
    plan = sparsify.plan(MODELS[model](), "tl1", total_steps=6, example_inputs={"pixel_values": X, "labels": Y})
    reasons = {e.reason for e in plan.entries if e.method is None and e.kind in ("Conv2d", "Linear")}
    assert reasons == {"no rule matched"}, reasons
