"""transformers' ``resize_token_embeddings`` after ``sparsify`` (new tokens added to a tokenizer):
it writes a resized tensor into the tied embedding's and LM head's weight in place, so the sparse
head's masks and thresholds no longer fit. Before, the next forward or ``sparsify.step`` raised
"The size of tensor a (120) must match the size of tensor b (100)" for every weight recipe. Now
the head computes dense from then on, becomes the plain layer holding that weight at the next
``sparsify.step`` (the tie kept), and the warning for replaced layers names it."""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsify

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

RECIPES = ["st3", "nm-2-4", "gmp", "str", "dual"]


def llama(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("resize_at", [0, 2])
@pytest.mark.parametrize("recipe", RECIPES)
def test_resize_token_embeddings_after_sparsify(recipe, resize_at):
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    soon = {"begin": 0, "end": 2} if recipe in ("st3", "gmp") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable root: expected (docs/transformers.md)
        model = sparsify.sparsify(llama(tied=True), recipe, total_steps=4, example_inputs=(ids,), **soon)
    assert isinstance(model.lm_head, sparsify.core.layers.SparseWeightMixin)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(4):
            if t == resize_at:
                model.resize_token_embeddings(120, mean_resizing=False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            batch = torch.randint(1, 120 if t >= resize_at else 100, (2, 12), generator=g)
            model(batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(model)
        final = sparsify.finalize(model)  # checked against the sparse model
    said = [str(w.message) for w in caught if "resize_token_embeddings" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("sparsify.step: lm_head replaced")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.shape == (120, 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert "lm_head" not in {n for g in model.sparsify_state.groups.values() for n in g.members}
    assert final.lm_head.weight is final.model.embed_tokens.weight
    others = [r for r in sparsify.report(model).layers if r.weight_sparsity is not None]
    assert others and all(r.name != "lm_head" for r in others)


def test_an_untied_head_resized_is_replaced_too():
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(llama(tied=False), "st3", total_steps=4, example_inputs=(ids,), begin=0, end=2)
    model.resize_token_embeddings(120, mean_resizing=False)
    batch = torch.randint(1, 120, (2, 12))
    model(batch, labels=batch).loss.backward()
    with pytest.warns(UserWarning, match="lm_head replaced"):
        sparsify.step(model)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.shape == (120, 32)
