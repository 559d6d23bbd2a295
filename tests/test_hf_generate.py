"""Causal LMs as their users call them after training: ``generate`` (KV cache, greedy) on the
sparsified model, on its finalized copy, and on the original class reloaded with
``from_pretrained`` from the finalized model's ``save_pretrained`` folder: the same tokens."""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsify
from hf_harness import cov  # skips this module without transformers
from loops import run_steps

# SAS widens the layers it rewrites: its finalized model is another architecture than the config's
RECIPES = ["st3", "gmp", "nm-2-4", "str", "dual", "tl1", "semi-structured"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_after_training_and_after_save_pretrained(family, recipe, tmp_path):
    model, (ids,), _ = cov.FAMILIES[family]()
    cls = type(model)
    kw = {"s_init": -3.0} if recipe == "str" else {}  # STR's soft threshold in play from the start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, recipe, total_steps=3, example_inputs=(ids,), **kw)
        opt = torch.optim.AdamW(sparsify.param_groups(m, 1e-4), lr=1e-2)
        run_steps(m, opt, [(ids, ids)] * 3, penalty=True, loss_of=lambda x, y: m(input_ids=x, labels=y).loss)
        assert (sparsify.report(m).totals.get("weight_sparsity") or 0) > 0 or recipe in ("tl1", "semi-structured")
        m.eval()
        prompt = ids[:, :4]
        tokens = m.generate(prompt, max_new_tokens=6, do_sample=False)
        final = sparsify.finalize(m, (ids,))
        assert torch.equal(final.generate(prompt, max_new_tokens=6, do_sample=False), tokens)
        final.save_pretrained(tmp_path)
        reloaded = cls.from_pretrained(tmp_path)
    assert type(reloaded) is cls
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False), tokens)
    assert tokens.shape == (2, 10)


@pytest.mark.parametrize("recipe", ["semi-structured", "tl1", "sas"])
def test_no_false_rewrote_nothing_warning(recipe):
    """The "rewrote nothing" warning is for sites a rule's method matched and declined: layers no
    rule selected (inside an untraceable submodule) are not such sites."""
    model, (ids,), _ = cov.FAMILIES["gpt2"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(model, recipe, total_steps=3, example_inputs=(ids,))
    said = [str(w.message) for w in caught if "rewrote nothing" in str(w.message)]
    assert said == [] or ("no rule matched" not in said[0] and recipe == "sas")


def test_falcon_linear_is_rewritten_and_comes_back_as_itself(tmp_path):
    """Falcon's ``FalconLinear`` computes ``x @ W.T + b`` in its own forward: it was left dense
    (1 of 9 Linear layers rewritten). It hands its weight to the matmul unchanged, so the sparse
    layer runs that forward with the effective weight and finalizes to a FalconLinear."""
    from transformers import FalconConfig, FalconForCausalLM

    from sparsify.integrations.huggingface import linear_share
    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "st3", total_steps=3, example_inputs=(ids,))
        assert linear_share(m)["param_share"] == 1.0
        opt = torch.optim.AdamW(sparsify.param_groups(m, 1e-4), lr=1e-2)
        run_steps(m, opt, [(ids, ids)] * 3, loss_of=lambda x, y: m(input_ids=x, labels=y).loss)
        m.eval()
        tokens = m.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
        final = sparsify.finalize(m, (ids,))
        assert {type(x).__name__ for x in final.modules() if isinstance(x, torch.nn.Linear)} == {"Linear", "FalconLinear"}
        final.save_pretrained(tmp_path)
        assert torch.equal(FalconForCausalLM.from_pretrained(tmp_path).generate(ids[:, :4], max_new_tokens=5,
                                                                               do_sample=False), tokens)
    assert sparsify.report(m).totals["mac_reduction"] == pytest.approx(0.9, abs=0.01)
