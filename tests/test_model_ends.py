"""``first`` / ``last`` in a rule describe the whole model, also when torch.fx traced it in pieces.

They were decided inside each traced graph: under the module-by-module fallback of transformers
models every block's MLP began with a "first" layer and ended with a "last" one, so a recipe that
keeps the model's ends dense (the built-in ``sas`` ones) kept every MLP dense, silently.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from strategies import Concat, Residual, build_model, count_example, example_input, model_specs, recipes

ENDS = {"version": 1, "rules": [
    {"match": {"type": ["Linear", "Conv1D", "Conv1d", "Conv2d"]}, "method": "magnitude", "params": {"sparsity": 0.5}},
    {"match": {"first": True}, "method": None},
    {"match": {"last": True}, "method": None}]}


def _plan(model, recipe, example_inputs=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.plan(model, recipe, example_inputs=example_inputs)


def _ends(plan) -> tuple[list[str], list[str]]:
    return (sorted(e.name for e in plan.dense if e.rule == 1), sorted(e.name for e in plan.dense if e.rule == 2))


def _make_untraceable(m: nn.Module) -> None:
    """``m``'s forward asks a question of its input that torch.fx cannot answer (a fallback)."""
    base = type(m)

    def forward(self, x):
        if x.numel() >= 0:  # a Proxy cannot be a condition: tracing this module fails
            return base.forward(self, x)

    m.__class__ = type(f"Untraceable{base.__name__}", (base,), {"forward": forward})


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_untraceable_pieces_keep_the_plan(data):
    """Property: making the root, its two Sequentials, any residual block or (with example inputs)
    any two-branch concat untraceable (so the model is traced in pieces, see docs/capture.md)
    leaves every site's method as it was, for random recipes with ``first`` / ``last`` rules."""
    count_example()
    spec = data.draw(model_specs(max_blocks=4))
    model = build_model(spec)
    recipe = data.draw(recipes(model))
    recipe["rules"] += [{"match": {"first": True}, "method": None}, {"match": {"last": True}, "method": None}]
    example = (example_input(spec),) if data.draw(st.booleans()) else None
    want = {e.name: (e.method, e.rule) for e in _plan(model, recipe, example).entries}

    pieces = build_model(spec)
    # with example inputs the calls say which branches read one tensor (Concat's two), without
    # them registration order cannot tell parallel branches from a chain
    kinds = (Residual, Concat) if example else (Residual,)
    names = [n for n, m in pieces.named_modules() if n in ("", "blocks", "head") or isinstance(m, kinds)]
    chosen = data.draw(st.sets(st.sampled_from(names), min_size=1))
    for name in chosen:
        _make_untraceable(pieces.get_submodule(name))
    plan = _plan(pieces, recipe, example)
    # a piece holding no site is not traced into at all (a leaf): fewer fallbacks than chosen
    assert {f["name"] for f in plan.fallbacks} <= chosen
    assert {e.name: (e.method, e.rule) for e in plan.entries} == want


# the model's ends by family (tiny configs). Inside a module run as it is, the layers called on
# one and the same tensor (q, k, v) are all first with example inputs; without them registration
# order stands in and only the first registered one is (docs/recipes.md#first-and-last)
FAMILY_ENDS = {
    "bert": (["bert.encoder.layer.0.attention.self." + p for p in ("key", "query", "value")], ["classifier"]),
    "gpt2": (["transformer.h.0.attn.c_attn"], ["lm_head"]),
    "vit": (["vit.embeddings.patch_embeddings.projection"], ["classifier"]),
    "llama": (["model.layers.0.self_attn." + p for p in ("k_proj", "q_proj", "v_proj")], ["lm_head"]),
    "t5": (["encoder.block.0.layer.0.SelfAttention." + p for p in "kqv"], ["lm_head"]),
    "whisper": (["model.encoder.conv1"], ["proj_out"]),
}
REGISTERED_FIRST = {"bert": ["bert.encoder.layer.0.attention.self.query"], "llama": ["model.layers.0.self_attn.q_proj"],
                    "t5": ["encoder.block.0.layer.0.SelfAttention.q"]}


@pytest.mark.parametrize("family", list(FAMILY_ENDS))
def test_transformers_ends_are_the_models(family):
    from hf_harness import cov  # skips without transformers
    model, inputs, _ = cov.FAMILIES[family]()
    with_inputs = _plan(model, ENDS, inputs)
    assert with_inputs.fallbacks  # traced in pieces: what this test is about
    first, last = FAMILY_ENDS[family]
    assert _ends(with_inputs) == (first, last)
    assert _ends(_plan(model, ENDS)) == (REGISTERED_FIRST.get(family, first), last)  # no forward run
    # every other layer, each block's MLP included, is rewritten
    assert len(with_inputs.rewritten) == len(with_inputs.entries) - len(first) - len(last)


@pytest.mark.parametrize("family", list(FAMILY_ENDS))
def test_a_rule_that_only_says_first_or_last_rewrites_those_layers(family):
    """A rule matching by ``first`` / ``last`` alone reaches the ends of a model traced in pieces:
    only they are rewritten (they are leaves of an untraceable forward, swapped as attributes)."""
    from hf_harness import cov  # skips without transformers
    for end, names in zip(("first", "last"), FAMILY_ENDS[family]):
        model, inputs, _ = cov.FAMILIES[family]()
        recipe = {"version": 1, "rules": [{"match": {end: True}, "method": "magnitude", "params": {"sparsity": 0.5}}]}
        assert sorted(e.name for e in _plan(model, recipe, inputs).rewritten) == names, end


def test_call_order_says_which_calls_read_one_tensor():
    from passes.call_record import CallRecord

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.c(self.a(x)) + self.b(x) + self.a(x + 1)

    spans = CallRecord(Net(), (torch.zeros(1, 2),)).call_order()
    assert [spans[n][:2] for n in "abc"] == [(0, 3), (2, 2), (1, 1)]
    assert spans["a"].first_input == spans["b"].first_input != spans["c"].first_input
    assert spans["a"].last_input not in (spans["a"].first_input, spans["c"].first_input)


def test_parallel_heads_of_a_detector_are_all_last():
    """Faster R-CNN's box predictor (untraceable: it asserts on its input) calls its class and
    box layers on one tensor: both are last, as a graph would say (then it holds no site and
    the second trace leaves it a leaf)."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5)
    plan = _plan(model, ENDS, ([torch.rand(3, 96, 96)],))
    assert {"", "roi_heads"} <= {f["name"] for f in plan.fallbacks}
    assert _ends(plan) == (["backbone.body.0.0"],
                           ["roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.cls_score"])


@pytest.mark.parametrize("untraceable", [["", "layer2"], ["layer2", "layer1.0"]])
def test_resnet_traced_in_pieces(untraceable):
    """ResNet-18 traced block by block: its stem and head are still the ends, and the built-in
    ``sas`` recipe still keeps the stem dense by its ``first`` rule."""
    import torchvision
    x = (torch.randn(1, 3, 64, 64),)
    pieces = torchvision.models.resnet18(num_classes=10)
    for name in untraceable:
        _make_untraceable(pieces.get_submodule(name))
    plan = _plan(pieces, ENDS, x)
    assert sorted(f["name"] for f in plan.fallbacks) == sorted(untraceable)
    assert _ends(plan) == (["conv1"], ["fc"]) and len(plan.rewritten) == len(plan.entries) - 2
    sas = {e.name: e for e in _plan(pieces, "sas", x).entries}
    assert sas["conv1"].reason == "excluded by rule 1"


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.dec(x)


class _ReachesPast(nn.Module):
    """Calls its child's child directly (``self.model.dec(x)``), as OPTForCausalLM calls
    ``self.model.decoder(...)``; untraceable (it branches on its input)."""

    def __init__(self):
        super().__init__()
        self.model, self.head = _Body(), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1
        return self.head(self.model.dec(x))


def test_a_grandchild_called_past_its_parent_is_first():
    """A child never called itself, whose descendants the untraceable parent calls, takes their
    place in the call order: the first layer is the body's, not the head (the head was first
    and last at once, and a rule keeping the first layer dense kept the head)."""
    plan = _plan(_ReachesPast(), ENDS, torch.randn(2, 8))
    assert _ends(plan) == (["model.dec.0"], ["head"])
    assert len(plan.rewritten) == 1


def test_opt_ends_are_its_first_block_and_head():
    """transformers' OPT: the causal LM's forward calls ``self.model.decoder`` directly."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install fx-sparsify[integrations])")
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    first, last = _ends(_plan(model, ENDS, {"input_ids": torch.randint(4, 100, (2, 8))}))
    assert first == ["model.decoder.layers.0.self_attn." + p for p in ("k_proj", "q_proj", "v_proj")]
    assert last == ["lm_head"]
