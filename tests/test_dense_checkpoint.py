"""A dense (pretrained) checkpoint loaded into a sparsified model: ``sparsify(model, r)`` then
``load_state_dict(dense, strict=False)`` gives the model ``sparsify`` makes of the loaded model,
for every built-in recipe (docs/index.md#dense-checkpoints). Before, N:M kept the masks of the
weights it was built from and ST-3 from step 0 its thresholds, and SAS's wider layers refused
the narrow weights (size mismatch)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import sparsify

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CASES = [(r, {}) for r in sorted(sparsify.builtin_recipes())] + [("st3", {"begin": 0}), ("gmp", {"begin": 0})]


def resnet(seed: int):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def quiet_sparsify(model, recipe, overrides, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left dense etc.: not what is tested here
        return sparsify.sparsify(model, recipe, total_steps=10, **overrides, **kw)


def assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(*x), b.eval()(*x), rtol=0, atol=0)


@pytest.mark.parametrize("recipe,overrides", CASES, ids=[r + "".join(f"-{k}{v}" for k, v in o.items()) for r, o in CASES])
def test_loading_dense_weights_after_sparsify_equals_sparsifying_the_loaded_model(recipe, overrides):
    pretrained = resnet(1).state_dict()
    reference = resnet(0)
    reference.load_state_dict(pretrained)
    expected = quiet_sparsify(reference, recipe, overrides, example_inputs=X)

    model = quiet_sparsify(resnet(0), recipe, overrides, example_inputs=X)
    result = model.load_state_dict(pretrained, strict=False)
    assert result.unexpected_keys == []
    assert any("holds no sparsify state" in k for k in result.missing_keys)
    assert_same_model(model, expected, (X,))


def test_a_dense_checkpoint_past_step_0_warns_and_keeps_the_masks():
    model = quiet_sparsify(resnet(0), "nm-2-4", {}, example_inputs=X)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(X).sum().backward()
    opt.step()
    sparsify.step(model)
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".mask")}
    with pytest.warns(UserWarning, match="at step 1: its masks and thresholds stay those computed from its earlier"):
        model.load_state_dict(resnet(1).state_dict(), strict=False)
    for k, v in masks.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_sparsified_checkpoint_is_loaded_as_saved():
    """The refresh is for checkpoints without sparsify state only: a sparsified one restores its
    own masks, which need not be the step-0 masks of its weights (here: set by hand)."""
    source = quiet_sparsify(resnet(1), "nm-2-4", {}, example_inputs=X)
    conv = source.get_submodule("layer1.0.conv1")
    conv.mask.fill_(True)
    model = quiet_sparsify(resnet(0), "nm-2-4", {}, example_inputs=X)
    model.load_state_dict(source.state_dict())
    assert bool(model.get_submodule("layer1.0.conv1").mask.all())


def test_strict_load_of_a_dense_checkpoint_says_what_to_do():
    model = quiet_sparsify(resnet(0), "nm-2-4", {}, example_inputs=X)
    with pytest.raises(RuntimeError, match="holds no sparsify state.*strict=False"):
        model.load_state_dict(resnet(1).state_dict())


@pytest.mark.parametrize("recipe,overrides", [("nm-2-4", {}), ("st3", {"begin": 0})], ids=["nm-2-4", "st3-begin0"])
def test_a_transformers_model_built_then_given_pretrained_weights(recipe, overrides):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)

    def llama(seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg)

    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    pretrained = llama(1).state_dict()
    reference = llama(0)
    reference.load_state_dict(pretrained)
    expected = quiet_sparsify(reference, recipe, overrides, example_inputs={"input_ids": ids})
    model = quiet_sparsify(llama(0), recipe, overrides, example_inputs={"input_ids": ids})
    model.load_state_dict(pretrained, strict=False)
    sa, sb = model.state_dict(), expected.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)
