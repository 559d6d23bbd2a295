"""A finalized model serves without fx-sparsify: for every recipe that keeps the architecture, its
``state_dict`` has the dense model's keys and shapes and loads, strictly, into the model built as
usual, which then computes exactly the finalized model's outputs. SAS (wider layers) and
semi-structured (a position-mask buffer per masked conv) change the architecture: they must be
the only ones (docs/deployment.md#serving-without-fx-sparsify)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparsify

RECIPES = sorted(sparsify.builtin_recipes())
CHANGE_ARCHITECTURE = {"sas", "sas-m4", "semi-structured"}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def dense():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def finalized(recipe):
    m = sparsify.sparsify(dense(), recipe, total_steps=2, example_inputs=X)
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.05)
    for _ in range(2):  # to the schedule's end: pruned, masks fixed
        loss = m(X).logsumexp(1).mean() + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m, loss.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # semi-structured: no loss given to step
        return sparsify.finalize(m).eval()


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_finalized_state_dict_loads_into_the_plain_model(recipe):
    final = finalized(recipe)
    plain = dense().eval()
    if recipe in CHANGE_ARCHITECTURE:
        with pytest.raises(RuntimeError, match="size mismatch|Unexpected key"):
            plain.load_state_dict(final.state_dict())
        return
    plain.load_state_dict(final.state_dict())  # strict: same keys, same shapes
    assert type(plain) is torchvision.models.ResNet
    with torch.no_grad():
        torch.testing.assert_close(plain(X), final(X), rtol=0, atol=0)
    if recipe in ("gmp", "st3", "st3-sigma", "nm-2-4", "dual"):  # pruned on a schedule: the zeros are in it
        assert float((plain.layer4[1].conv2.weight == 0).float().mean()) > 0.3


class ScaledLinear(nn.Linear):
    """A user's Linear subclass: no forward of its own, a buffer and a method of its own."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scratch", torch.ones(3), persistent=False)

    def norm(self):
        return self.weight.norm()


@pytest.mark.parametrize("recipe", ["st3", "gmp", "nm-2-4", "str"])
def test_finalized_layers_keep_their_own_class_and_tensors(recipe):
    torch.manual_seed(0)
    dense_model = nn.Sequential(ScaledLinear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    keys = set(dense_model.state_dict())
    m = sparsify.sparsify(dense_model, recipe, total_steps=2, example_inputs=torch.randn(2, 16))
    sparsify.step(m)
    sparsify.step(m)
    final = sparsify.finalize(m)
    assert type(final[0]) is ScaledLinear and type(final[2]) is nn.Linear
    assert set(final.state_dict()) == keys and "scratch" in dict(final[0].named_buffers())
    assert float(final[0].norm()) == pytest.approx(float(final[0].weight.norm()))


def test_multihead_attention_keeps_its_unquantizable_out_proj():
    # torch marks MultiheadAttention.out_proj NonDynamicallyQuantizableLinear (its forward reads the
    # weight itself); a finalized plain nn.Linear there made quantize_dynamic break the attention
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=10)  # torchvision's ViT, small
    m = sparsify.sparsify(vit, "st3", total_steps=2, example_inputs=x)
    sparsify.step(m)
    final = sparsify.finalize(m).eval()
    out_proj = final.encoder.layers.encoder_layer_0.self_attention.out_proj
    assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    quantized = torch.ao.quantization.quantize_dynamic(final, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        assert quantized(x).shape == (2, 10)


#: what the rebuild of a finalized model's structure adds to the recipe (docs/deployment.md)
REBUILD = {"semi-structured": {"begin": 0, "end": 0}}


@pytest.mark.parametrize("recipe", sorted(CHANGE_ARCHITECTURE))
def test_the_finalized_structure_rebuilt_as_documented_loads_strictly(recipe):
    """docs/deployment.md said the structure comes from re-running sparsify + finalize: for
    semi-structured the fresh model is in its dense phase, finalize drops its masks (no zeros
    yet), and the saved model's `<conv>_pmask.mask` keys were unexpected."""
    final = finalized(recipe)
    saved = {k: v.clone() for k, v in final.state_dict().items()}

    def rebuilt(**extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sparsify.finalize(sparsify.sparsify(dense(), recipe, total_steps=2, example_inputs=X, **extra))

    if recipe in REBUILD:  # as the recipe alone builds it: the masks are not there yet
        with pytest.raises(RuntimeError, match="Unexpected key.*_pmask.mask"):
            rebuilt().load_state_dict(saved)
    shell = rebuilt(**REBUILD.get(recipe, {})).eval()
    shell.load_state_dict(saved)  # strict
    with torch.no_grad():
        torch.testing.assert_close(shell(X), final(X), rtol=0, atol=0)
