"""``save_pretrained`` of a model in sparse training (docs/transformers.md#saving): its folder is a
training checkpoint, and ``from_pretrained`` of it into the plain class gives the dense model
(the masks are entries transformers drops). ``sparsify`` says so once, outside a running
``Trainer`` (whose checkpoints are resumed into a sparsified model); the finalized model saves
silently and reloads sparse."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import sparsify

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

IDS = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
WARNING = "save_pretrained of a model in sparse training writes a training checkpoint"


def trained_llama(recipe="gmp"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable root: expected (docs/transformers.md)
        model = sparsify.sparsify(transformers.LlamaForCausalLM(cfg), recipe, total_steps=2, example_inputs=(IDS,),
                                  begin=0, end=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(model)
    return model


def saves(model, path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(path)
    return [str(w.message) for w in caught if WARNING in str(w.message)]


def test_the_sparsified_model_says_its_folder_reloads_dense(tmp_path):
    model = trained_llama()
    said = saves(model, tmp_path / "a")
    assert len(said) == 1 and "sparsify.finalize(model).save_pretrained(path)" in said[0]
    assert saves(model, tmp_path / "b") == []  # once
    # what it warns about: the reloaded plain model is dense
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a")
    assert float((reloaded.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.0


def test_the_finalized_model_saves_silently_and_reloads_sparse(tmp_path):
    model = trained_llama()
    final = sparsify.finalize(model)
    assert "save_pretrained" not in final.__dict__
    assert saves(final, tmp_path) == []
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert float((reloaded.model.layers[0].mlp.up_proj.weight == 0).float().mean()) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, final(IDS).logits)


def test_copies_and_pickles_keep_a_working_save_pretrained(tmp_path):
    model = trained_llama()
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.__self__ is twin
    assert len(saves(twin, tmp_path / "twin")) == 1
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    back.save_pretrained(tmp_path / "back")  # whatever route pickling gives it, it saves
    assert (tmp_path / "back" / "config.json").exists()


def test_trainer_checkpoints_are_quiet_and_the_final_save_model_warns(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from sparsify.integrations.huggingface import SparsifyTrainerCallback

    model = trained_llama()
    data = [{"input_ids": IDS[0], "labels": IDS[0]}] * 8
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          use_cpu=True, report_to=[], save_strategy="steps", save_steps=1,
                                          logging_strategy="no", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SparsifyTrainerCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert (tmp_path / "checkpoint-2").exists()
    assert [w for w in caught if WARNING in str(w.message)] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.save_model(str(tmp_path / "final"))
    assert len([w for w in caught if WARNING in str(w.message)]) == 1


@pytest.mark.parametrize("recipe,warned", [("semi-structured", True), ("sas", True), ("st3", False), ("tl1", False)])
def test_a_finalized_model_its_class_cannot_rebuild_says_so_at_save_pretrained(tmp_path, recipe, warned):
    """SAS's wider layers and semi-structured's mask modules are not what the class builds:
    from_pretrained of the folder dropped the masks silently (outputs off by 0.05 to 4 on HF ResNet,
    ConvNeXt, CLIP) or refused the weights. The finalized model says so at save_pretrained, once."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3))
    model = sparsify.sparsify(net, recipe, total_steps=2, example_inputs={"pixel_values": x})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = model(pixel_values=x, labels=torch.tensor([0, 1])).loss + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model, loss=loss)
    final = sparsify.finalize(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final.save_pretrained(tmp_path / "a")
        final.save_pretrained(tmp_path / "b")
    said = [str(w.message) for w in caught if "which ResNetForImageClassification does not build" in str(w.message)]
    assert len(said) == int(warned), said
    # what from_pretrained does with the method's modules, only that (it said "drops the masks
    # silently, or refuses the wider weights" after either)
    if recipe == "sas":
        assert "from_pretrained refuses the wider weights" in said[0] and "drops" not in said[0], said
    if recipe == "semi-structured":
        assert "from_pretrained drops them silently" in said[0] and "refuses" not in said[0], said
    if recipe == "semi-structured":  # what it warns about: the reloaded model lost the masks
        reloaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "a").eval()
        with torch.no_grad():
            assert not torch.allclose(reloaded(pixel_values=x).logits, final(pixel_values=x).logits)


class Clip(torch.nn.Module):
    """A user's module: zero the activations below 0.3."""

    def forward(self, x):
        return torch.where(x.abs() < 0.3, torch.zeros_like(x), x)


@pytest.mark.parametrize("layout,said_with", [
    (None, "modules of method 't-clip' that its finalize_member keeps (Clip; the method declares no deploy_layout)"),
    ("the clips", "holds the clips, which"), ("", None)])
def test_a_user_method_keeping_its_own_module_is_said_at_save_pretrained(tmp_path, layout, said_with):
    """A user's method whose finalize_member keeps a module of its own, declaring no deploy_layout:
    from_pretrained of the finalized model's folder dropped the module without a word (outputs 0.14
    off on GPT-2). Undeclared, the kept modules are named; deploy_layout "" says there is nothing."""
    from sparsify.core.contract import Group, Method
    from sparsify.core.registry import REGISTRY, register

    class ClipGroup(Group):
        def target(self, step):
            return None

        def final_target(self):
            return None

        def finalize_member(self, name, module):
            return module  # part of the deployed model

    @register
    class ClipMethod(Method):
        name, site, inserts_after, group_class, deploy_layout = "t-clip", "node", True, ClipGroup, layout

        def apply(self, site, params):
            site.insert_after(Clip(), "clip")
    try:
        torch.manual_seed(0)
        net = transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3))
        x = torch.randn(2, 3, 32, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = sparsify.sparsify(net, {"version": 1, "rules": [{"match": {"type": "ReLU"}, "method": "t-clip"}]},
                                      example_inputs={"pixel_values": x})
        final = sparsify.finalize(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            final.save_pretrained(tmp_path)
    finally:
        REGISTRY.pop("t-clip", None)
    said = [str(w.message) for w in caught if "which ResNetForImageClassification does not build" in str(w.message)]
    assert len(said) == (said_with is not None) and all(said_with in m for m in said), said
    reloaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path).eval()  # what it warns about
    with torch.no_grad():
        assert not torch.allclose(reloaded(pixel_values=x).logits, final(pixel_values=x).logits)


def test_a_sas_training_folder_is_said_to_be_refused(tmp_path):
    """SAS's training weights are M times wider than the class's: from_pretrained of the folder
    refuses them (it does not give the dense model), and the warning says so and points to
    torch.export for serving, not to the finalized model's save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                    num_labels=2)
    px = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(transformers.ResNetForImageClassification(cfg), "sas", total_steps=2,
                                  example_inputs={"pixel_values": px})
    said = saves(model, tmp_path)
    assert len(said) == 1 and "SAS layers M times wider" in said[0] and "refuses" in said[0]
    assert "DENSE" not in said[0] and "torch.export" in said[0]
    with pytest.raises(RuntimeError, match="mismatched"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.ResNetForImageClassification.from_pretrained(tmp_path)


def test_a_removed_weight_norm_is_said_at_finalize_and_putting_it_back_reloads(tmp_path):
    """Wav2Vec2's positional conv is weight_norm'ed; sparsify advises removing the norm to take the
    layer in. Following that, finalize + save_pretrained wrote a plain ``weight`` the class does
    not load (it reads the norm's keys): from_pretrained gave NaN outputs, silently. Now sparsify's
    advice and a finalize warning give the call that puts the norm back, after which the folder
    reloads to the same outputs, the layer's zeros kept."""
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, pad_token_id=0, mask_time_prob=0.0, layerdrop=0.0)
    model = transformers.Wav2Vec2ForCTC(cfg)
    x, labels = torch.randn(2, 800), torch.randint(1, 20, (2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, "gmp", example_inputs={"input_values": x})
    advice = {e.name: e.reason for e in plan.dense}["wav2vec2.encoder.pos_conv_embed.conv"]  # sparsify() warns it
    assert "remove_parametrizations" in advice and "parametrizations.weight_norm(layer, 'weight', dim=2)" in advice
    parametrize.remove_parametrizations(model.wav2vec2.encoder.pos_conv_embed.conv, "weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(model, "gmp", total_steps=2, example_inputs={"input_values": x}, begin=0, end=1)
    for _ in range(2):
        model(input_values=x, labels=labels).loss.backward()
        sparsify.step(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = sparsify.finalize(model)
    said = [str(w.message) for w in caught
            if "builds wav2vec2.encoder.pos_conv_embed.conv with weight_norm" in str(w.message)]
    call = "torch.nn.utils.parametrizations.weight_norm(model.wav2vec2.encoder.pos_conv_embed.conv, 'weight', dim=2)"
    assert len(said) == 1 and call in said[0], [str(w.message) for w in caught]
    conv = final.wav2vec2.encoder.pos_conv_embed.conv
    zeros = int((conv.weight == 0).sum())
    assert zeros > 0
    torch.nn.utils.parametrizations.weight_norm(conv, "weight", dim=2)  # what the warning says
    final.save_pretrained(tmp_path)
    reloaded = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_values=x).logits, final.eval()(input_values=x).logits)
    assert int((reloaded.wav2vec2.encoder.pos_conv_embed.conv.weight == 0).sum()) == zeros
