"""transformers models (tiny configs, no download) through the tracing fallback: BERT and ViT with
ST-3, end to end (sparsify -> 2 training steps -> report -> finalize with its output check)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.state import find_state

from hf_harness import cov  # skips this module without transformers


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "ViTForImageClassification"])
def test_st3_reaches_every_linear_and_trains(name):
    torch.manual_seed(0)
    model, inputs, _ = cov.MODELS[name]()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "st3", total_steps=2, example_inputs=inputs)
    plan = find_state(m).plan
    assert plan.fallbacks  # the root does not trace: this is the fallback path
    assert {e.name for e in plan.rewritten} >= set(linear)
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
    m.train()
    for _ in range(2):
        logits = m(*inputs).logits
        loss = logits.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)
    rows = sparsify.report(m).layers
    assert {r.name for r in rows} >= set(linear)
    assert all(r.weight_sparsity > 0.5 for r in rows)
    m.eval()
    expected = m(*inputs).logits
    final = sparsify.finalize(m, inputs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final(*inputs).logits, expected)
    assert not any(type(x).__module__.startswith("sparsify") for x in final.modules())


def test_bert_embeddings_are_traced_as_bert_calls_them():
    """BertModel passes token_type_ids=None to its embeddings; traced on its own, the child took it
    as a tensor input and failed when called. Specialised to the recorded call (CallRecord), the
    traced model computes what BERT does."""
    from passes import trace
    from passes.tracing import CallRecord
    torch.manual_seed(0)
    model, inputs, _ = cov.bert()
    model.eval()
    expected = model(*inputs).logits
    plain = trace(copy.deepcopy(model)).module  # unspecialised: BertModel's call misfits its guard
    torch.testing.assert_close(plain(*inputs).logits, expected)
    work = copy.deepcopy(model)
    r = trace(work, calls=CallRecord(work, inputs))
    # specialised, the embeddings slice a buffer by the traced sequence length: kept as a leaf
    assert "bert.embeddings" in {f.name for f in r.fallbacks} and "bert.pooler" in r.graphs
    torch.testing.assert_close(r.module(*inputs).logits, expected)


def test_tl1_reaches_the_mlp_activations():
    torch.manual_seed(0)
    model, inputs, _ = cov.vit()
    c = cov.coverage(model, "tl1", inputs)
    assert c["activations"].get("GELUActivation", 0) == 2  # one per encoder layer's MLP, kept a module call


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "GPT2LMHeadModel"])
def test_every_call_works_without_example_inputs(name):
    """Sparsified without example_inputs (nothing recorded, nothing guessed), the model answers the
    calls its users make: keywords, optional inputs present or absent, labels, other lengths and
    batch sizes. st3 is dense at step 0, so the outputs equal the original's."""
    torch.manual_seed(0)
    model, _, _ = cov.MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "st3", total_steps=100)
    m.eval(), model.eval()
    gen = torch.Generator().manual_seed(1)
    for batch, length in ((2, 8), (3, 5), (1, 12)):
        ids = torch.randint(0, 100, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        labels = ids if name.startswith("GPT2") else torch.randint(0, 3, (batch,), generator=gen)
        calls = [((ids,), {}), ((), {"input_ids": ids}), ((), {"input_ids": ids, "attention_mask": mask}),
                 ((), {"input_ids": ids, "attention_mask": mask, "labels": labels})]
        if name.startswith("Bert"):
            calls.append(((), {"input_ids": ids, "token_type_ids": torch.ones_like(ids), "labels": labels}))
        for args, kwargs in calls:
            got, want = m(*args, **kwargs), model(*args, **kwargs)
            torch.testing.assert_close(got.logits, want.logits)
            if "labels" in kwargs:
                torch.testing.assert_close(got.loss, want.loss)
    m.train()
    ids = torch.randint(0, 100, (2, 6), generator=gen)
    labels = ids if name.startswith("GPT2") else torch.tensor([0, 2])
    m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
