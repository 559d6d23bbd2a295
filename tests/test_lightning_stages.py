"""Lightning: SparsifyCallback outside one bounded ``fit``: ``test`` / ``validate`` / ``predict``
after fit or from a checkpoint, a network built in ``configure_model``, a run without a set
length, and a resumed run made longer."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsify

pytest.importorskip("lightning", reason="the Lightning callback needs lightning (pip install fx-sparsify[integrations])")

import lightning.pytorch as pl  # noqa: E402

from sparsify.integrations.lightning import SparsifyCallback, sparsify_as_saved  # noqa: E402
from test_integrations import loader, tiny_cnn  # noqa: E402

X = torch.zeros(1, 3, 16, 16)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tiny_cnn()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(sparsify.param_groups(self.net), lr=0.1)


def trainer(callbacks, **kw):
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return pl.Trainer(callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", **kw)


def said(caught) -> list[str]:
    return [str(w.message) for w in caught if "sparsify" in str(w.message).lower()]


def test_test_validate_and_predict_after_a_fit_bounded_by_max_epochs(tmp_path):
    """They crashed: setup read estimated_stepping_batches, which needs the train dataloader."""
    module = Classifier()
    t = trainer([SparsifyCallback("gmp", attr="net", example_inputs=X)], max_epochs=1,
                enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, loader())
    step = int(module.net.sparsify_state.step)
    assert step == 3
    assert t.test(module, loader(), verbose=False)[0]["test_loss"] > 0
    assert t.validate(module, loader(), verbose=False)[0]["val_loss"] > 0
    assert len(t.predict(module, loader())) == 3
    assert t.test(module, loader(), ckpt_path="best", verbose=False)[0]["test_loss"] > 0
    assert int(module.net.sparsify_state.step) == step  # evaluation takes no sparsify step


class LoadsAsSaved(Classifier):
    """What docs/integrations.md suggests for ``load_from_checkpoint``."""

    def on_load_checkpoint(self, checkpoint):
        sparsify_as_saved(self, checkpoint, example_inputs=X)


def written_checkpoint(tmp_path):
    """A checkpoint of a run ``SparsifyCallback("gmp", attr="net")`` sparsified, and its val loss."""
    module = Classifier()
    t = trainer([SparsifyCallback("gmp", attr="net", example_inputs=X)], max_epochs=1,
                enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, loader())
    return t.checkpoint_callback.best_model_path, t.validate(module, loader(), verbose=False)[0]["val_loss"]


@pytest.mark.parametrize("module_type, callback", [
    (Classifier, lambda: SparsifyCallback("gmp", attr="net", example_inputs=X)),
    (LoadsAsSaved, lambda: SparsifyCallback("gmp", attr="net", example_inputs=X)),
    (LoadsAsSaved, SparsifyCallback)], ids=["callback", "on_load_checkpoint+callback", "on_load_checkpoint"])
def test_validate_a_fresh_module_from_a_checkpoint_of_a_sparse_run(tmp_path, module_type, callback):
    """A new process: callback setup runs before the checkpoint is restored, and refused the module
    as not sparsified, also when its on_load_checkpoint would have sparsified it."""
    path, val_loss = written_checkpoint(tmp_path)
    fresh = module_type()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = trainer([callback()], max_epochs=1).validate(fresh, loader(), ckpt_path=path, verbose=False)
    assert out[0]["val_loss"] == pytest.approx(val_loss)
    assert int(fresh.net.sparsify_state.step) == 3
    assert not [w for w in said(caught) if "dense" in w], said(caught)


@pytest.mark.parametrize("callback", [lambda: SparsifyCallback("gmp", attr="net"), SparsifyCallback])
def test_a_dense_baseline_validates_as_it_is_and_says_so(callback):
    module = Classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer([callback()], max_epochs=1)
        assert t.validate(module, loader(), verbose=False)[0]["val_loss"] > 0
        assert len(t.predict(module, loader())) == 3
    assert not sparsify.core.state.find_state(module.net, required=False)
    assert len([w for w in said(caught) if "runs" in w and "dense" in w]) == 2, said(caught)


class BuiltInConfigureModel(Classifier):
    """Lightning's FSDP path: the network is built in configure_model, after callback setup."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:  # Lightning calls it in every stage
            self.net = tiny_cnn()


@pytest.mark.parametrize("ema", ["none", "before", "after"])
def test_a_network_built_in_configure_model_is_sparsified_after_it(ema):
    """It failed with 'BuiltInConfigureModel.net is NoneType'. EMAWeightAveraging calls
    configure_model in its own setup: listed either side, its copy is of the sparse network."""
    module = BuiltInConfigureModel()
    callback = SparsifyCallback("gmp", attr="net", example_inputs=X)
    averaging = [pl.callbacks.EMAWeightAveraging()] if ema != "none" else []
    callbacks = averaging + [callback] if ema == "before" else [callback] + averaging
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(callbacks, max_epochs=2)
        t.fit(module, loader())
    state = module.net.sparsify_state
    assert int(state.step) == state.total_steps == 6, said(caught)
    held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in module.net.parameters() if p.requires_grad}  # the optimizer has the sparse net's
    assert sparsify.report(module.net).to_dict()["totals"]["targeted_weight_sparsity"] == pytest.approx(0.9, abs=0.02)
    if averaging:
        assert sparsify.core.state.find_state(averaging[0]._average_model.module.net, required=False) is not None
    assert t.test(module, loader(), verbose=False)[0]["test_loss"] > 0


def test_a_run_without_a_set_length_asks_for_total_steps():
    """max_epochs=-1 with max_time: 'OverflowError: cannot convert float infinity to integer'."""
    module = Classifier()
    t = trainer([SparsifyCallback("gmp", attr="net", example_inputs=X)], max_epochs=-1, max_time={"seconds": 1})
    with pytest.raises(ValueError, match=r"no run length .* pass SparsifyCallback\('gmp', attr='net', total_steps=N\)"):
        t.fit(module, loader())
    module = Classifier()
    t = trainer([SparsifyCallback("gmp", attr="net", example_inputs=X, total_steps=4)], max_epochs=-1,
                max_time={"seconds": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the run may go past total_steps: it is only a second long)
        t.fit(module, loader())
    assert module.net.sparsify_state.total_steps == 4 and int(module.net.sparsify_state.step) > 0


def test_a_resumed_run_made_longer_is_told_which_total_steps_to_pass(tmp_path):
    """max_epochs 1 -> 2 on resume: the load was refused with 'build the model with the same recipe,
    overrides and total_steps before load_state_dict', which SparsifyCallback does, not the user."""
    path, _ = written_checkpoint(tmp_path)
    longer = trainer([SparsifyCallback("gmp", attr="net", example_inputs=X)], max_epochs=2)
    with pytest.raises(RuntimeError, match=r"total_steps: 3 in the checkpoint, 6 here.*"
                                           r"SparsifyCallback\('gmp', attr='net', total_steps=3\)"):
        longer.fit(Classifier(), loader(), ckpt_path=path)
    module = Classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (it trains on past total_steps, at the final sparsity)
        trainer([SparsifyCallback("gmp", attr="net", example_inputs=X, total_steps=3)], max_epochs=2).fit(
            module, loader(), ckpt_path=path)
    assert int(module.net.sparsify_state.step) == 6


class SparsifiedInConfigureModel(BuiltInConfigureModel):
    def configure_model(self):
        if self.net is None:
            self.net = sparsify.sparsify(tiny_cnn(), "gmp", total_steps=3, example_inputs=X)


def test_a_network_the_user_sparsifies_in_configure_model_is_driven():
    """SparsifyCallback() refused it at setup ('no sparsified module'): configure_model runs after."""
    module = SparsifiedInConfigureModel()
    trainer([SparsifyCallback()], max_epochs=1).fit(module, loader())
    assert int(module.net.sparsify_state.step) == 3
