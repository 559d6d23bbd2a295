"""Thirteen more transformers families from tiny configs (no download), called the way their users
call them: keyword inputs with labels, the model's own loss. A weight method, an activation method
and both together each sparsify, train, finalize (with its output check) and answer keyword calls
as the sparse model does. wav2vec2's weight-normed positional conv made every weight method raise
before (tests/test_parametrized_layers.py)."""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsify

T = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install fx-sparsify[integrations])")


def _ids(n=8):
    return torch.randint(2, 100, (2, n), generator=torch.Generator().manual_seed(n))


def _img(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
_LM = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=64)
_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _classifier(config, model, **extra):
    x = _ids()
    return model(config(**{**_TEXT, **extra}, num_labels=3)), (x,), dict(
        input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 2]))


def _causal(config, model, **extra):
    x = _ids()
    return model(config(**{**_LM, **extra})), (x,), dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x)


def _vision(config, model, **kw):
    x = _img()
    return model(config(**kw, num_labels=3)), (x,), dict(pixel_values=x, labels=torch.tensor([0, 2]))


FAMILIES = {
    "distilbert": lambda: _classifier(lambda **c: T.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        num_labels=c["num_labels"]), T.DistilBertForSequenceClassification),
    "roberta": lambda: _classifier(T.RobertaConfig, T.RobertaForSequenceClassification, pad_token_id=1),
    "albert": lambda: _classifier(T.AlbertConfig, T.AlbertForSequenceClassification, embedding_size=16),
    "deberta-v2": lambda: _classifier(T.DebertaV2Config, T.DebertaV2ForSequenceClassification),
    "mistral": lambda: _causal(T.MistralConfig, T.MistralForCausalLM),
    "qwen2": lambda: _causal(T.Qwen2Config, T.Qwen2ForCausalLM),
    "gemma": lambda: _causal(T.GemmaConfig, T.GemmaForCausalLM, head_dim=16),
    "gpt-neox": lambda: _causal(T.GPTNeoXConfig, T.GPTNeoXForCausalLM),
    "swin": lambda: _vision(T.SwinConfig, T.SwinForImageClassification, image_size=32, patch_size=4, embed_dim=16,
                            depths=[1, 1], num_heads=[1, 2], window_size=4),
    "convnext": lambda: _vision(T.ConvNextConfig, T.ConvNextForImageClassification, num_stages=2,
                                hidden_sizes=[8, 16], depths=[1, 1]),
    "dinov2": lambda: _vision(T.Dinov2Config, T.Dinov2ForImageClassification, **_VIT),
    "mobilevit": lambda: _vision(T.MobileViTConfig, T.MobileViTForImageClassification, image_size=32,
                                 hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 32]),
    "wav2vec2": lambda: (lambda x: (T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_labels=3)), (x,), dict(input_values=x, labels=torch.tensor([0, 2]))))(
        torch.randn(2, 400, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("recipe", ["st3", "tl1", "dual"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_on_its_own_loss_and_finalizes(family, recipe):
    torch.manual_seed(0)
    model, example, call = FAMILIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untraceable roots and dense layers are said; expected here
        m = sparsify.sparsify(model, recipe, total_steps=2, example_inputs=example)
        plan = sparsify.core.state.find_state(m).plan
        assert plan.rewritten, plan
        opt = torch.optim.AdamW(sparsify.param_groups(m, 1e-4), lr=1e-3)
        m.train()
        for _ in range(2):
            loss = m(**call).loss + sparsify.penalty(m)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m, loss=loss.detach())
        m.eval()
        final = sparsify.finalize(m, example, rtol=1e-3, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(final(**call).logits, m(**call).logits, rtol=1e-3, atol=1e-4)
