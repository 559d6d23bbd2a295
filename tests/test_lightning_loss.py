"""Lightning and the penalty: an accumulated optimizer step weighs it as the whole batch's
step does; a training step that returns None (a skipped batch) or runs its own backward
(manual optimization) neither crashes nor drops the penalty silently; a run shorter than the
schedule of a module the user sparsified says so before training."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsify

pytest.importorskip("lightning", reason="the Lightning callback needs lightning (pip install fx-sparsify[integrations])")

import lightning.pytorch as pl  # noqa: E402

from sparsify.integrations.lightning import SparsifyCallback  # noqa: E402
from test_integrations import loader, tiny_cnn  # noqa: E402


class Classifier(pl.LightningModule):
    """``manual``: the step runs its own backward, adding the penalty when ``collect``;
    ``skip``: batch indices whose step returns None."""

    def __init__(self, manual=False, collect=True, skip=(), net=None):
        super().__init__()
        self.net = tiny_cnn() if net is None else net
        self.automatic_optimization = not manual
        self.collect, self.skip = collect, set(skip)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss + sparsify.penalty(self.net) if self.collect else loss)
            opt.step()
        return None if batch_idx in self.skip else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.5)


def fit(module, callback, data, **kw):
    trainer = pl.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    return [str(w.message) for w in caught if "sparsify" in str(w.message)]


def test_an_accumulated_step_weighs_the_penalty_as_the_whole_batch():
    """Lightning divides the returned loss, penalty included, by the accumulation: 4 micro-batches
    of 2 give the whole batch of 8's step (tl1's means over equal micro-batches average)."""
    steps = []
    for batch, accumulate in ((8, 1), (2, 4)):
        torch.manual_seed(0)  # no BatchNorm: its statistics differ between micro-batches and the batch
        module = Classifier(net=torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)))
        before = {k: v.detach().clone() for k, v in module.net.named_parameters()}
        fit(module, SparsifyCallback("tl1", attr="net"), loader(n=8, batch=batch), max_steps=1,
            accumulate_grad_batches=accumulate)
        steps.append({k: v.detach() - before[k] for k, v in module.net.named_parameters()})
    whole, accumulated = steps
    assert all(torch.allclose(whole[k], accumulated[k], rtol=1e-4, atol=1e-7) for k in whole)


def test_a_skipped_batch_does_not_crash():
    """A step returning None (Lightning skips the batch) met ``None + penalty``."""
    module = Classifier(skip={1})
    said = fit(module, SparsifyCallback("tl1", attr="net"), loader(), max_steps=2)
    assert int(module.net.sparsify_state.step) == 2
    assert not [w for w in said if "never collected" in w]


@pytest.mark.parametrize("returns", ["loss", "none"])
def test_manual_optimization_leaves_the_penalty_to_the_step(returns):
    """Under manual optimization the callback added the penalty to a value nobody
    back-propagates (silently dropped) or crashed on None; now the terms stay recorded: a step
    that adds sparsify.penalty itself trains with it, one that does not is warned."""
    skip = {0, 1, 2} if returns == "none" else set()
    collected = Classifier(manual=True, skip=skip)
    assert not [w for w in fit(collected, SparsifyCallback("tl1", attr="net"), loader(), max_steps=3)
                if "never collected" in w]
    assert int(collected.net.sparsify_state.step) == 3
    forgotten = Classifier(manual=True, collect=False, skip=skip)
    said = fit(forgotten, SparsifyCallback("tl1", attr="net"), loader(), max_steps=3)
    assert [w for w in said if "never collected" in w]
    # the penalty moved the weights: the two runs start equal and end apart
    assert not torch.allclose(collected.net[0].weight, forgotten.net[0].weight)


def test_a_run_shorter_than_the_users_schedule_is_told_before_training():
    net = sparsify.sparsify(tiny_cnn(), "gmp", total_steps=100)
    said = fit(Classifier(net=net), SparsifyCallback(), loader(), max_steps=3)
    short = [w for w in said if "the run takes 3 optimizer steps" in w]
    assert len(short) == 1 and "total_steps=3" in short[0]


class Recorded(Classifier):
    """Keeps the loss each training step returned."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.returned = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.returned.append(float(loss))
        return loss


def test_sparsify_step_gets_the_mean_loss_of_the_steps_micro_batches(monkeypatch):
    """Under accumulate_grad_batches=k it got the last micro-batch's loss divided by k (Lightning's
    outputs["loss"]), penalty included; now, as the Hugging Face callback gives it, the mean of the
    losses the step's micro-batches returned. Semi-structured keeps the mask map of the lowest."""
    given, original = [], sparsify.step

    def step(model, loss=None):
        given.append(float(loss))
        return original(model, loss)
    monkeypatch.setattr(sparsify, "step", step)
    module = Recorded()
    fit(module, SparsifyCallback("tl1", attr="net"), loader(n=12, batch=2), max_steps=3, accumulate_grad_batches=2)
    r = module.returned
    assert given == pytest.approx([(r[0] + r[1]) / 2, (r[2] + r[3]) / 2, (r[4] + r[5]) / 2])
