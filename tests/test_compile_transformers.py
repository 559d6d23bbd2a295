"""torch.compile of sparsified transformers models (tiny configs, called as their users call
them: keyword inputs with labels): every built-in recipe compiles to the graphs the dense model
compiles to. GPT-2 takes the Conv1D layers (weight ``(in, out)``) and the tied LM head; BERT the
plain Linear layers. (GPT-2's dense forward already breaks once, in transformers' own code.)"""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsify

from hf_harness import cov  # noqa: F401  (skips this module, saying why, without transformers)
import transformers

IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
MODELS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)),
        dict(input_ids=IDS, labels=IDS)),
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3)), dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=torch.tensor([0, 1]))),
}


def graphs(model, inputs) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    return explained.graph_count, explained.graph_break_count


@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_recipe_compiles_to_the_dense_models_graphs(family):
    build, inputs = MODELS[family]
    torch.manual_seed(0)
    dense = graphs(build().train(), inputs)
    for recipe in sorted(sparsify.builtin_recipes()):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "rewrote nothing" (sas: GELU models), said by sparsify
            model = sparsify.sparsify(build().train(), recipe, total_steps=4, example_inputs=inputs)
        assert graphs(model, inputs) == dense, recipe
