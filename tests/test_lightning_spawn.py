"""Lightning's process-starting strategies (``ddp_spawn``): the module of the process that calls
``fit`` gets the trained state back. A module sparsified before ``fit`` comes back with its masks
and step; ``SparsifyCallback(recipe, attr)`` would sparsify only inside the started processes
(the caller's module stayed dense and got the latent weights without masks, silently): it
refuses. A semi-structured model could not be sent at all: its random generator pickled a
tensor freed before the other process opened it."""
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

X = torch.randn(1, 3, 16, 16)


class Classifier(pl.LightningModule):
    def __init__(self, net=None):
        super().__init__()
        self.net = tiny_cnn() if net is None else net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(sparsify.param_groups(self.net, 5e-4), lr=0.05)


class CloseProcessGroup(pl.Callback):
    """Ends each started process's gloo group before the process exits: left to interpreter exit,
    its threads were once torn down mid-flight after a finished ``fit`` ("terminate called without
    an active exception", the process killed by SIGABRT; seen once in a dozen suite runs)."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def fit_spawned(module, callback):
    trainer = pl.Trainer(max_steps=4, callbacks=[callback, CloseProcessGroup()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2,
                         strategy="ddp_spawn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(n=32, batch=4))


@pytest.mark.parametrize("recipe", ["gmp", "semi-structured"])
def test_a_module_sparsified_before_fit_comes_back_with_its_state(recipe):
    module = Classifier(sparsify.sparsify(tiny_cnn(), recipe, total_steps=4, example_inputs=(X,)))
    fit_spawned(module, SparsifyCallback())
    assert int(module.net.sparsify_state.step) == 4
    achieved = sparsify.report(module.net).totals["achieved"]
    if recipe == "gmp":
        assert achieved["weights"] == pytest.approx(0.9, abs=0.01)
    else:
        assert achieved["output positions"] > 0.1


def test_sparsifying_inside_the_started_processes_refuses():
    with pytest.raises(Exception, match="Sparsify it before fit"):
        fit_spawned(Classifier(), SparsifyCallback("gmp", attr="net", example_inputs=(X,)))
