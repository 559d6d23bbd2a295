"""torch's own ``nn.TransformerEncoder`` / ``nn.TransformerDecoderLayer``.

In eval under ``no_grad`` ``nn.TransformerEncoderLayer`` takes an inference fast path
(``torch._transformer_encoder_layer_fwd``) that reads ``self_attn.out_proj.weight`` as stored:
the sparse model computed with the dense ``out_proj`` there (gmp: 0.56 max abs apart from its own
training-mode path; finalize refused it: "relative difference 0.178"). A sparse attention module
now carries a no-op forward pre-hook, which makes torch take the regular path; the finalized model
has no hook and takes the fast path again. And a torch layer traced as the root is given its class
back by finalize (it was a graph whose ``_assert_is_none`` TorchScript cannot compile).

The layers' feed-forward ``linear1`` / ``linear2`` (half the weights) stayed dense: the layers are
torch leaves, never traced. Their regular forward calls them as modules, so they are now rewritten
as attributes (sparsify/prepare/fast_path.py), in encoder and decoder layers alike."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
RECIPES = ["gmp", "nm-2-4", "str", "st3", "dual"]


def trained(net, recipe, args):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedules at step 0
        m = sparsify.sparsify(net, recipe, total_steps=2, example_inputs=args, begin=0, end=1) if recipe in (
            "gmp", "st3") else sparsify.sparsify(net, recipe, total_steps=2, example_inputs=args)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(2):
        (m(*args).pow(2).mean() + sparsify.penalty(m)).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(m)
    return m


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_encoders_inference_fast_path_sees_the_sparse_weights(recipe):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    m = trained(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), recipe, (X,)).eval()
    names = {row.name for row in sparsify.report(m).layers}
    assert {f"layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1",
                                                        "linear2")} <= names  # attention and feed-forward
    with torch.no_grad():
        inference = m(X)  # where torch would take its fast path
    torch.testing.assert_close(inference, m(X).detach(), rtol=1e-5, atol=1e-6)  # the path with gradients (0.56 apart before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", sparsify.FinalizeWarning)  # outputs equal, not explained away
        final = sparsify.finalize(m)  # its check compares eval outputs under no_grad
    assert type(final) is nn.TransformerEncoder
    assert not any(mod._forward_pre_hooks for mod in final.modules())
    with torch.no_grad():
        torch.testing.assert_close(final(X), inference, rtol=1e-4, atol=1e-5)


def test_a_torch_layer_traced_as_the_root_is_its_class_again_and_scripts():
    torch.manual_seed(0)
    m = trained(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, dropout=0.0), "gmp", (X, X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(m)
    assert type(final) is nn.TransformerDecoderLayer
    scripted = torch.jit.script(final)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X, X), final(X, X), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
def test_the_decoders_feed_forward_layers_are_sparse_and_finalize(recipe):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    m = trained(nn.TransformerDecoder(layer, 2), recipe, (X, X)).eval()
    rows = {row.name: row for row in sparsify.report(m).layers}
    assert {"layers.1.linear1", "layers.1.linear2", "layers.1.multihead_attn.out_proj"} <= set(rows)
    assert float((m.layers[1].linear1.effective_weight() == 0).float().mean()) > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsify.FinalizeWarning)  # outputs equal, not explained away
        final = sparsify.finalize(m)
    assert type(final.layers[1]) is nn.TransformerDecoderLayer and type(final.layers[1].linear1) is nn.Linear
    assert float((final.layers[1].linear1.weight == 0).float().mean()) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(final(X, X), m(X, X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", ["gmp", "tl1"])
def test_the_encoders_nested_tensor_path_with_a_padding_mask(recipe):
    # eval under no_grad with a padding mask: nn.TransformerEncoder turns the batch into a nested tensor,
    # which a sparse layer's regular path cannot take ("Nested tensor dimension 0 cannot be transposed"),
    # and gives the padded positions back as zeros. The sparse encoder keeps to padded tensors and zeroes
    # those positions itself: it computed other values there, and finalize (its own check run with the mask)
    # failed inside its divergence search on the nested tensor
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 2,
                                norm=nn.LayerNorm(16))
    assert enc.use_nested_tensor
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    m = trained(enc, recipe, (X,)).eval()
    with torch.no_grad():
        inference = m(X, src_key_padding_mask=mask)
    torch.testing.assert_close(inference[~mask], m(X, src_key_padding_mask=mask).detach()[~mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inference[mask], m.norm(torch.zeros(2, 16))[:1].expand(2, 16))  # norm of zeros
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", sparsify.FinalizeWarning)
        final = sparsify.finalize(m, example_inputs=(X, None, mask))
    assert type(final) is nn.TransformerEncoder and final.use_nested_tensor
    with torch.no_grad():  # torch's own forward, nested path and all
        torch.testing.assert_close(final(X, src_key_padding_mask=mask), inference, rtol=1e-4, atol=1e-5)
