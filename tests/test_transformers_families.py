"""transformers families from tiny configs (no download) × every built-in recipe: sparsify, three
steps on the model's own loss (labels passed), report, finalize with its output check, save and
reload (benchmarks/transformers_coverage.py's end_to_end); and what the recipes reach there."""
from __future__ import annotations


import pytest

import sparsify

from hf_harness import cov  # skips this module without transformers


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
@pytest.mark.parametrize("family", list(cov.FAMILIES))
def test_family_end_to_end(family, recipe):
    assert cov.end_to_end(family, recipe) == "ok"


# activation modules each family's MLPs call (transformers' own classes or torch's), all reached
ACTIVATIONS = {"bert": "GELUActivation", "gpt2": "NewGELUActivation", "vit": "GELUActivation", "llama": "SiLUActivation",
               "t5": "ReLU", "clip": "QuickGELUActivation", "whisper": "GELUActivation"}


@pytest.mark.parametrize("family", list(ACTIVATIONS))
def test_tl1_reaches_the_mlp_activations(family):
    model, inputs, _ = cov.FAMILIES[family]()
    c = cov.coverage(model, "tl1", inputs)
    assert c["activations"].get(ACTIVATIONS[family], 0) >= 2, c["activations"]


@pytest.mark.parametrize("family", list(cov.FAMILIES))
def test_st3_reaches_every_linear(family):
    """Every Linear-like layer is rewritten, except a head tied to the embedding (T5 ties it
    whatever the config says), which the plan lists with the reason."""
    import warnings
    model, inputs, _ = cov.FAMILIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, "st3", example_inputs=inputs)
    layers = set(cov._weight_layers(model))
    done = {e.name for e in plan.rewritten}
    tied = {e.name for e in plan.dense if "tied to" in e.reason}
    assert layers == done | tied and tied <= ({"lm_head"} if family == "t5" else set())


def test_bloom_gelu_is_an_activation():
    """Bloom's MLP calls ``BloomGelu`` (GELU's tanh approximation through its own autograd
    function): not recognised, tl1 reached nothing and dual lost its Tℓ1 stage, with only "rule
    matched nothing" said."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model = BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2))
    m = sparsify.sparsify(model, "tl1", total_steps=3, example_inputs=(ids,))
    assert sum(len(g.members) for g in m.sparsify_state.groups.values()) == 2  # one per block
    m.train()
    m(input_ids=ids, labels=ids)
    assert float(sparsify.penalty(m)) > 0


def test_fused_moe_experts_are_listed_and_warned():
    """Mixtral's experts are 3-D parameters (transformers 5), not Linear layers: the recipes reach
    attention only, and ``report`` said 90% over the layers it sees while 86% of the model's
    weights stayed dense, unsaid. The plan lists each stacked tensor; sparsify warns once."""
    import warnings
    import torch
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(model, "st3", example_inputs=(ids,), total_steps=10)
    plan = sparsify.plan(model, "st3", example_inputs=(ids,))
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    stacked = {e.name: e for e in plan.dense if e.kind.startswith("MixtralExperts.")}
    assert sorted(stacked) == sorted(experts) and len(experts) == 4
    assert all(e.params == model.get_parameter(e.name).numel() for e in stacked.values())
    said = [str(w.message) for w in caught if "stacked weight tensor" in str(w.message)]
    assert len(said) == 1 and "4 stacked weight tensor(s) stay dense, 85% of the model's weight" in said[0]
    assert plan.shares()["param_share"] < 0.15  # the experts count in the plan's shares


def test_no_stacked_weights_reported_for_dense_families():
    """Position embeddings ``(1, N, D)`` and layer scales ``(C, 1, 1)`` are no stacked matrices."""
    for family in ("vit", "clip", "whisper"):
        model, inputs, _ = cov.FAMILIES[family]()
        plan = sparsify.plan(model, "st3", example_inputs=inputs)
        assert not [e for e in plan.entries if e.reason.startswith("stacked")], family
