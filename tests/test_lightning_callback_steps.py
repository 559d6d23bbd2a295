"""Lightning: which optimizer steps advance a sparsified module, and where a resumed run counts
from. Under manual optimization ``trainer.global_step`` counts every optimizer's steps: a GAN
whose generator alone is sparsified ran its schedule twice as fast. A resumed run whose
checkpoint held no callback state replayed every step since 0 at its first batch. A checkpoint
written by ``SparsifyCallback(recipe, attr=...)`` did not load with ``load_from_checkpoint``."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

pytest.importorskip("lightning", reason="the Lightning callback needs lightning (pip install fx-sparsify[integrations])")

import lightning.pytorch as pl  # noqa: E402

from sparsify.integrations.lightning import SparsifyCallback, sparsify_as_saved  # noqa: E402

Z = torch.zeros(1, 8)


def mlp(n_in, n_out):
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out))


class GAN(pl.LightningModule):
    """Manual optimization, two optimizers: ``critic`` discriminator steps, then one generator step."""

    def __init__(self, gen=None, disc=None, critic=1):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.gen = mlp(8, 4) if gen is None else gen
        self.disc = mlp(4, 1) if disc is None else disc
        self.critic, self.disc_sparse = critic, disc is not None

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn(x.shape[0], 8))
        for _ in range(self.critic):
            loss_d = F.softplus(self.disc(fake.detach())).mean() + F.softplus(-self.disc(x)).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d + (sparsify.penalty(self.disc) if self.disc_sparse else 0))
            opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(F.softplus(-self.disc(fake)).mean() + sparsify.penalty(self.gen))
        opt_g.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.disc.parameters(), lr=0.01)


class Regressor(pl.LightningModule):
    def __init__(self, total_steps=12):
        super().__init__()
        torch.manual_seed(0)
        self.net = sparsify.sparsify(mlp(8, 1), "gmp", total_steps=total_steps, example_inputs=Z)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(sparsify.param_groups(self.net), lr=0.01)


class SteppedByHand(Regressor):
    """A run before the callback: the user's own hook steps the schedule (or not, or ``times`` a batch)."""

    def __init__(self, step=True, times=1):
        super().__init__()
        self.step, self.times = step, times

    def on_train_batch_end(self, outputs, batch, batch_idx):
        for _ in range(self.times if self.step else 0):
            sparsify.step(self.net)


def data(n=10, batch=2, target=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * batch, 8 if target else 4, generator=g)
    tensors = (x, torch.randn(n * batch, 1, generator=g)) if target else (x,)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch)


def fit(module, callbacks, loader, ckpt_path=None, **kw):
    trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, [str(w.message) for w in caught if "sparsify" in str(w.message).lower()]


def test_a_gans_discriminator_steps_do_not_advance_the_generator():
    """10 batches: 10 generator steps, global_step 20; the schedule ran 20 and overshot total_steps."""
    module = GAN()
    trainer, said = fit(module, [SparsifyCallback("gmp", attr="gen", example_inputs=Z)], data(), max_epochs=1)
    assert trainer.global_step == 20
    state = module.gen.sparsify_state
    assert int(state.step) == state.total_steps == 10, said
    assert not [w for w in said if "past total_steps" in w or "followed no optimizer step" in w], said


def test_each_sparsified_module_counts_its_own_optimizers_steps():
    """Both networks sparsified by the user, two discriminator steps a batch: 10 and 20, not 30 each."""
    gen = sparsify.sparsify(mlp(8, 4), "gmp", total_steps=10, example_inputs=Z)
    disc = sparsify.sparsify(mlp(4, 1), "gmp", total_steps=20, example_inputs=torch.zeros(1, 4))
    module = GAN(gen, disc, critic=2)
    trainer, said = fit(module, [SparsifyCallback()], data(), max_epochs=1)
    assert trainer.global_step == 30
    assert (int(module.gen.sparsify_state.step), int(module.disc.sparsify_state.step)) == (10, 20), said
    # the discriminator's two steps a batch are caught up at the batch's end, call after call: that
    # second call was counted as following no optimizer step (10 of 20: 'more often than the optimizer')
    assert not [w for w in said if "followed no optimizer step" in w], said


def test_a_total_taken_from_max_steps_under_manual_optimization_is_checked():
    """max_steps=20 counts both optimizers' steps: the generator gets 10, and its schedule was sized 20."""
    module = GAN()
    _, said = fit(module, [SparsifyCallback("gmp", attr="gen", example_inputs=Z)], data(n=40), max_steps=20)
    assert int(module.gen.sparsify_state.step) == 10
    told = [w for w in said if w.startswith("SparsifyCallback: pl_module.gen took 1 of the 2")]
    assert len(told) == 1 and "total_steps=10)" in told[0], said


def _first_run(tmp_path, step=True):
    trainer, _ = fit(SteppedByHand(step), [], data(n=6, batch=4, target=True), max_steps=6)
    trainer.save_checkpoint(tmp_path / "run1.ckpt")
    return tmp_path / "run1.ckpt"


def test_a_resume_without_callback_state_goes_on_from_the_models_step(tmp_path):
    """Run 1 stepped the schedule by hand (6 steps); run 2 adds the callback: 12 at the end, not 18."""
    module = Regressor()
    trainer, said = fit(module, [SparsifyCallback()], data(n=6, batch=4, target=True), _first_run(tmp_path),
                        max_steps=12)
    assert trainer.global_step == 12
    assert int(module.net.sparsify_state.step) == 12, said
    assert not [w for w in said if "past total_steps" in w or "resumes at global_step" in w], said


def test_a_resume_where_the_models_step_lags_says_which_it_follows(tmp_path):
    """Run 1 never stepped the schedule: the model is at step 0, the trainer at 6. It goes on from 0
    (6 more steps), and says so once; it used to replay 7 steps at the first batch."""
    module = Regressor()
    _, said = fit(module, [SparsifyCallback()], data(n=6, batch=4, target=True), _first_run(tmp_path, step=False),
                  max_steps=12)
    assert int(module.net.sparsify_state.step) == 6
    told = [w for w in said if "resumes at global_step" in w]
    assert len(told) == 1 and "net is at sparsify step 0" in told[0] and "follows the module's step 0" in told[0]


def test_a_checkpoint_of_the_callbacks_sparsifying_loads_with_load_from_checkpoint(tmp_path):
    """SparsifyCallback(recipe, attr) sparsifies at setup; the class builds the network dense:
    load_from_checkpoint refused the sparse keys until the module calls sparsify_as_saved."""

    class Dense(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = mlp(8, 1)

        training_step, configure_optimizers = Regressor.training_step, Regressor.configure_optimizers

    class Reloadable(Dense):
        def on_load_checkpoint(self, checkpoint):
            sparsify_as_saved(self, checkpoint, example_inputs=Z)

    trained = Reloadable()
    trainer, _ = fit(trained, [SparsifyCallback("gmp", attr="net", sparsity=0.5, example_inputs=Z)],
                     data(n=6, batch=4, target=True), max_steps=6)
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Dense.load_from_checkpoint(tmp_path / "sparse.ckpt")
    loaded = Reloadable.load_from_checkpoint(tmp_path / "sparse.ckpt")
    assert int(loaded.net.sparsify_state.step) == 6
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval().net(x), trained.eval().net(x))
    assert sparsify.report(loaded.net).totals["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert type(sparsify.finalize(loaded.net)[0]) is nn.Linear


def test_a_resume_where_the_models_step_is_ahead_says_which_it_follows(tmp_path):
    """Run 1 stepped the schedule twice per optimizer step (model at 6, trainer at 3): the
    resumed run follows the model's step and says so, as it does for a model that lags."""
    first, _ = fit(SteppedByHand(times=2), [], data(6, 2, True), max_steps=3)
    first.save_checkpoint(tmp_path / "run1.ckpt")
    module = Regressor()
    _, messages = fit(module, [SparsifyCallback()], data(6, 2, True), tmp_path / "run1.ckpt", max_steps=5)
    told = [w for w in messages if "resumes at global_step" in w]
    assert len(told) == 1 and "net is at sparsify step 6" in told[0] and "global_step 3" in told[0], messages
    assert int(module.net.sparsify_state.step) == 8


def test_a_manual_run_ended_by_its_epochs_is_not_told_its_total_is_wrong():
    """A GAN sparsified by the callback (generator: 1 of 2 optimizer steps a batch) under
    max_epochs=1 and a larger max_steps: the epoch ends the run, at 10 generator steps, which is
    the total taken from the trainer: no warning about total_steps."""
    module = GAN()
    callback = SparsifyCallback("gmp", attr="gen", example_inputs=torch.zeros(1, 8))
    _, messages = fit(module, [callback], data(10, 2, False), max_epochs=1, max_steps=100)
    assert int(module.gen.sparsify_state.step) == module.gen.sparsify_state.total_steps == 10
    assert not [w for w in messages if "optimizer steps of this batch" in w], messages
