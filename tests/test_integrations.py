"""PyTorch Lightning and Hugging Face Trainer callbacks (optional extra ``integrations``)."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.state import find_state


def _require(module):
    if importlib.util.find_spec(module) is None:
        print(f"skipping: {module} is not installed (pip install fx-sparsify[integrations])")
        pytest.skip(f"{module} is not installed (pip install fx-sparsify[integrations])")


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def loader(n=12, batch=4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _lightning_module():
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()
            self.ce = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.ce.append(float(loss))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(sparsify.param_groups(self.net, weight_decay=5e-4), lr=0.05)
    return Classifier()


def _trainer(callback, **kw):
    import lightning.pytorch as pl
    return pl.Trainer(max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kw)


@pytest.mark.parametrize("accumulate,precision", [(1, None), (2, None), (1, "bf16-true")])
def test_lightning_callback_sparsifies_and_steps(accumulate, precision):
    # bf16-true: Lightning casts the module (and the inputs) to bfloat16; finalize checks on the
    # example inputs, cast with it
    _require("lightning")
    from sparsify.integrations.lightning import SparsifyCallback
    module = _lightning_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(SparsifyCallback("st3", attr="net", example_inputs=torch.zeros(1, 3, 16, 16)),
                 accumulate_grad_batches=accumulate, **({"precision": precision} if precision else {})
                 ).fit(module, loader(n=4 * 3 * accumulate))
    assert next(module.net.parameters()).dtype == (torch.bfloat16 if precision else torch.float32)
    state = find_state(module.net)
    assert int(state.step) == 3  # one sparsify.step per optimizer step, not per batch
    assert state.total_steps == 3  # from trainer.estimated_stepping_batches
    # ST-3 at 90% (end = half of 3 steps): the schedule has reached its target
    assert sparsify.report(module.net).totals["weight_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert type(sparsify.finalize(module.net).get_submodule("0")) is nn.Conv2d


def test_lightning_callback_adds_the_penalty():
    _require("lightning")
    from sparsify.integrations.lightning import SparsifyCallback
    module = _lightning_module()
    cb = SparsifyCallback("tl1", attr="net", example_inputs=torch.zeros(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(cb).fit(module, loader())
    # the wrapped training_step returns cross-entropy + the activation penalty
    x, y = next(iter(loader()))
    module.train()
    total = module.training_step((x, y), 0)
    assert float(total) > module.ce[-1] + 1e-6


def _lightning_classifier_with_validation():
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()
            self.seen = []  # the validation outputs

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            self.seen.append(self.net(batch[0]).detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(sparsify.param_groups(self.net, weight_decay=5e-4), lr=0.05)
    return Classifier()


@pytest.mark.parametrize("order", ["sparsify-first", "averaging-first"])
@pytest.mark.parametrize("recipe", ["gmp", "dual", "nm-2-4"])
def test_lightning_weight_averaging_keeps_the_sparsity(recipe, order):
    """Lightning's EMAWeightAveraging swaps the averaged copy into the model for validation and
    copies it in at the end of fit, buffers included: the masks must be the training model's, not
    their average (a 90% GMP model used to end fit at 63%), in either callback order (the averaging
    callback listed first used to copy the dense module and fail its first update)."""
    _require("lightning")
    import lightning.pytorch as pl
    if not hasattr(pl.callbacks, "EMAWeightAveraging"):
        print("skipping: this Lightning has no EMAWeightAveraging (2.6 and later have it)")
        pytest.skip("this Lightning has no EMAWeightAveraging (2.6 and later have it)")
    from sparsify.integrations.lightning import SparsifyCallback
    module = _lightning_classifier_with_validation()
    callbacks = [SparsifyCallback(recipe, attr="net", example_inputs=torch.zeros(1, 3, 16, 16)),
                 pl.callbacks.EMAWeightAveraging(decay=0.5)]
    if order == "averaging-first":
        callbacks.reverse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                   num_sanity_val_steps=0).fit(module, loader(n=12), loader(n=4))
    averaged = next(c for c in callbacks if isinstance(c, pl.callbacks.EMAWeightAveraging))._average_model.module.net
    net = module.net
    totals = sparsify.report(net).totals
    assert totals["weight_sparsity"] == pytest.approx(totals["target"], abs=0.01)
    from sparsify.core.extra_state import unpack
    for (name, mine), (_, theirs) in zip(net.state_dict().items(), averaged.state_dict().items()):
        if name.endswith("_extra_state"):  # the same but for the flag that marks the copy sync updated
            mine, theirs = ({k: v for k, v in unpack(t).items() if k != "synced"} for t in (mine, theirs))
            assert str(mine) == str(theirs), name
        else:
            assert torch.equal(mine, theirs), name  # fit ends with the averaged copy in the model
    # the last validation ran the averaged copy, which nothing changed since
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(next(iter(loader(n=4)))[0]), module.seen[-1])


@pytest.mark.parametrize("order", ["sparsify-first", "swa-first"])
def test_lightning_stochastic_weight_averaging(order):
    """Lightning's SWA copies the module in its setup, averages parameters, copies them back at
    the end and adds an epoch that only refreshes BatchNorm statistics (no backward): the copy is
    made from the sparsified module in either order (listed first, it used to copy the dense one),
    that epoch is no sparsify.step (it used to warn of a step past total_steps), and the model
    ends with its own masks."""
    _require("lightning")
    import lightning.pytorch as pl
    from sparsify.integrations.lightning import SparsifyCallback
    module = _lightning_module()
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    callbacks = [SparsifyCallback("gmp", attr="net", example_inputs=torch.zeros(1, 3, 16, 16)), swa]
    if order == "swa-first":
        callbacks.reverse()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        pl.Trainer(max_epochs=4, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module, loader(n=12))
    assert not [w for w in said if "sparsify" in str(w.message)], [str(w.message) for w in said]
    state = find_state(module.net)
    assert int(state.step) == state.total_steps == 12  # 4 epochs x 3 batches; the BatchNorm epoch is not a step
    assert sparsify.report(module.net).totals["weight_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert find_state(swa._average_model.net) is not None  # its copy is of the sparsified module


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=10))


def test_huggingface_trainer_callback(tmp_path):
    _require("transformers")
    _require("accelerate")
    from transformers import Trainer, TrainingArguments

    from sparsify.integrations.huggingface import SparsifyTrainerCallback, linear_share

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(_hf_vit(), "st3", total_steps=2, example_inputs=(torch.randn(1, 3, 32, 32),))
        share = linear_share(model)
        assert share["rewritten"] > 0
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                 report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3,
                                 logging_strategy="no", dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=Images(), callbacks=[SparsifyTrainerCallback()]).train()
    assert int(find_state(model).step) == 2
    rows = sparsify.report(model).layers
    # every Linear (share) plus the patch-embedding Conv2d, reached inside the untraceable embeddings
    assert sum(r.kind.endswith("Linear") for r in rows) == share["rewritten"] == share["linear"]
    assert len(rows) == share["rewritten"] + 1 and all(r.weight_sparsity > 0.5 for r in rows)


def test_huggingface_trainer_without_the_callback_is_told_about_it(tmp_path):
    _require("transformers")
    _require("accelerate")
    from transformers import Trainer, TrainingArguments

    from sparsify.core.pace import LAG

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4 * LAG

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 10}
    model = sparsify.sparsify(_hf_vit(), "st3", total_steps=LAG, example_inputs=(torch.randn(1, 3, 32, 32),))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=LAG, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, logging_strategy="no", dataloader_num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=model, args=args, train_dataset=Images()).train()  # no SparsifyTrainerCallback
    said = [str(w.message) for w in caught if "since the last sparsify.step" in str(w.message)]
    assert len(said) == 1 and "SparsifyTrainerCallback" in said[0]
    assert int(find_state(model).step) == 0


@pytest.mark.parametrize("recipe", ["str", "dual", "nm-2-4"])
def test_huggingface_trainer_checkpoints_and_resumes_exactly(tmp_path, recipe):
    """The Trainer's defaults: checkpoints in safetensors (tensors only) and the fused AdamW, which
    writes weights without bumping their version counter. A run resumed from its step-2 checkpoint
    ends exactly where the uninterrupted one does."""
    _require("transformers")
    _require("accelerate")
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from sparsify.integrations.huggingface import SparsifyTrainerCallback

    def model():
        torch.manual_seed(0)
        bert = BertForSequenceClassification(BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=3, max_position_embeddings=16))
        kw = {"s_init": -3.0} if recipe == "str" else {}  # STR's soft threshold in play from the start
        return sparsify.sparsify(bert, recipe, total_steps=4, **kw)

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": i % 3} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="steps", save_steps=2, logging_strategy="no",
                             learning_rate=1e-2, seed=0, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = model()
        Trainer(model=whole, args=args, train_dataset=data, callbacks=[SparsifyTrainerCallback()]).train()
        resumed = model()
        Trainer(model=resumed, args=args, train_dataset=data, callbacks=[SparsifyTrainerCallback()]).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert int(find_state(resumed).step) == 4 and sparsify.report(resumed).totals["weight_sparsity"] > 0


def test_accelerate_save_state_and_load_state_resume_exactly(tmp_path):
    """accelerate's ``save_state`` writes the model as safetensors (tensors only)."""
    _require("accelerate")
    from accelerate import Accelerator

    def build():
        model = sparsify.sparsify(tiny_cnn(), "dual", total_steps=6, example_inputs=torch.zeros(1, 3, 16, 16))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    saver = Accelerator(cpu=True)
    model, opt = saver.prepare(*build())
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
        opt.zero_grad()
        saver.backward(loss)
        opt.step()
        sparsify.step(model)
    saver.save_state(str(tmp_path))
    loader = Accelerator(cpu=True)
    fresh, fresh_opt = loader.prepare(*build())
    loader.load_state(str(tmp_path))
    a, b = model.state_dict(), fresh.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [] and int(find_state(fresh).step) == 3


@pytest.mark.parametrize("recipe", ["gmp", "nm-2-4"])
def test_accelerate_bf16_unwrapped_model_finalizes_as_its_class(recipe):
    """accelerate's mixed_precision wraps the model's forward in autocast on the instance, and
    unwrap_model keeps the wrapper by default: finalize compared its bfloat16 outputs with the
    plain float32 model's and blamed the layers it changed (FinalizeError for gmp, a rounding
    FinalizeWarning for nm-2-4). It runs the class's forward instead; the model keeps its wrapper."""
    _require("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # one precision per process: the other tests' Accelerator is fp32
    try:
        _finalize_after_bf16(Accelerator(cpu=True, mixed_precision="bf16"), recipe)
    finally:
        AcceleratorState._reset_state(True)


def _finalize_after_bf16(acc, recipe):
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    model = sparsify.sparsify(tiny_cnn(), recipe, total_steps=4, begin=0, example_inputs=x[:1])
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
        sparsify.step(model)
    unwrapped = acc.unwrap_model(model)
    assert "forward" in unwrapped.__dict__  # what this test is about: the autocast wrapper is on it
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsify.FinalizeWarning)
        final = sparsify.finalize(unwrapped)
    assert "forward" not in final.__dict__ and "forward" in unwrapped.__dict__
    with torch.no_grad():
        assert final(x).dtype == torch.float32 and unwrapped(x).dtype == torch.float32  # (fp32 outputs)
