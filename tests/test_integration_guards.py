"""Guards on the trainer integrations and the distributed checks: the loss transformers' Trainer
callback gives ``sparsify.step`` is its own optimizer step's (no evaluation forwards, no earlier
steps) and a callback reused for a second ``train()`` keeps adding the penalty; Lightning's
callback adds the penalty to a ``{"loss": ...}`` step, hands the loss to ``sparsify.step``,
steps under an optimizer that holds flat copies, and does not misreport a GAN's resume;
``sparsify_as_saved`` leaves a network sparsified in ``__init__`` alone; ``state_fingerprint``
and ``assert_synchronized`` tell ranks whose weights differ apart (docs/integrations.md,
docs/transformers.md, docs/distributed.md)."""
from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sparsify
from spawned import spawn
from sparsify.integrations.distributed import assert_synchronized, state_fingerprint


def _require(module, why):
    if importlib.util.find_spec(module) is None:
        print(f"skipping: {module} is not installed ({why}; pip install fx-sparsify[integrations])")
    pytest.importorskip(module, reason=f"{module} is not installed ({why}; pip install fx-sparsify[integrations])")


# --- transformers' Trainer -------------------------------------------------------------------


def _hf_train(model, callback, monkeypatch, runs=1, **kw):
    """Train ``model`` with the Trainer ``runs`` times (one callback); the number of micro-batch
    losses behind each ``sparsify.step`` call, and the warnings that mention sparsify."""
    _require("transformers", "the Trainer callback needs it")
    _require("accelerate", "the Trainer needs it")
    from test_hf_trainer_loss import token_data
    from transformers import Trainer, TrainingArguments

    from sparsify.integrations import huggingface as hf
    seen, real = [], hf.step_loss
    monkeypatch.setattr(hf, "step_loss", lambda losses: (seen.append(len(losses)), real(losses))[1])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(runs):
            Trainer(model=model, args=args, train_dataset=token_data(8), eval_dataset=token_data(2),
                    callbacks=[callback]).train()
    return seen, [str(w.message) for w in caught if "sparsify" in str(w.message).lower()]


def _gpt2(total_steps):
    _require("transformers", "the Trainer callback needs it")
    from test_hf_trainer_loss import gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the children torch.fx cannot trace (docs/transformers.md)
        return gpt2("tl1", total_steps=total_steps)


def test_hf_evaluation_forwards_stay_out_of_the_step_loss(monkeypatch):
    """With evaluation every step, each sparsify.step gets its own training micro-batch only: an
    eval loss counted in would skew the loss semi-structured keeps its masks by (docs/transformers.md)."""
    from sparsify.integrations.huggingface import SparsifyTrainerCallback
    model = _gpt2(3)
    seen, _ = _hf_train(model, SparsifyTrainerCallback(), monkeypatch, max_steps=3, per_device_eval_batch_size=2,
                        eval_strategy="steps", eval_steps=1)
    assert seen == [1, 1, 1]
    assert int(model.sparsify_state.step) == 3


def test_hf_each_step_loss_is_its_own_accumulated_micro_batches(monkeypatch):
    """Two micro-batches accumulated per step: each step's loss averages those two, not every
    micro-batch since training began (docs/transformers.md)."""
    from sparsify.integrations.huggingface import SparsifyTrainerCallback
    model = _gpt2(3)
    seen, _ = _hf_train(model, SparsifyTrainerCallback(), monkeypatch, max_steps=3, gradient_accumulation_steps=2)
    assert seen == [2, 2, 2]


def test_hf_a_callback_reused_for_a_second_train_keeps_adding_the_penalty(monkeypatch):
    """Train, then train more with the same callback: the second run still adds the penalty
    (its forwards are seen) and is not told the penalty was never collected."""
    from sparsify.integrations.huggingface import SparsifyTrainerCallback
    model = _gpt2(4)
    seen, said = _hf_train(model, SparsifyTrainerCallback(), monkeypatch, runs=2, max_steps=2)
    assert seen == [1, 1, 1, 1]
    assert not [w for w in said if "never collected" in w], said
    assert int(model.sparsify_state.step) == 4


# --- Lightning -------------------------------------------------------------------------------


def _pl():
    _require("lightning", "the Lightning callback needs it")
    import lightning.pytorch as pl
    return pl


def _classifier(returns_dict):
    """A small CNN classifier whose training_step returns ``{"loss": ...}`` or the tensor, and
    records its cross-entropy."""
    pl = _pl()

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
            self.task = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.task.append(float(loss))
            return {"loss": loss} if returns_dict else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)
    return Classifier()


def _pl_fit(module, callback, monkeypatch, max_steps=2):
    """Fit on 8 images in batches of 4; the penalties the callback added, the losses Lightning
    saw at each batch end, and the losses handed to sparsify.step."""
    pl = _pl()
    penalties, ends, stepped = [], [], []
    real_penalty, real_step = sparsify.penalty, sparsify.step

    def penalty(m):
        p = real_penalty(m)
        penalties.append(float(p))
        return p

    def step(m, loss=None):
        stepped.append(None if loss is None else float(loss))
        return real_step(m, loss)
    monkeypatch.setattr(sparsify, "penalty", penalty)
    monkeypatch.setattr(sparsify, "step", step)

    class Ends(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback, Ends()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return penalties, ends, stepped


def test_pl_a_dict_returning_step_gets_the_penalty(monkeypatch):
    """A training_step returning {"loss": ...} trains on loss + penalty, as one returning the
    tensor does (docs/integrations.md: the returned loss includes sparsify.penalty)."""
    from sparsify.integrations.lightning import SparsifyCallback
    module = _classifier(returns_dict=True)
    penalties, ends, _ = _pl_fit(module, SparsifyCallback("tl1", attr="net", lam=1.0), monkeypatch)
    assert len(penalties) == len(ends) == len(module.task) == 2
    assert all(p > 0 for p in penalties)
    assert ends == pytest.approx([t + p for t, p in zip(module.task, penalties)], rel=1e-6)


def test_pl_sparsify_step_gets_the_training_loss(monkeypatch):
    """Each sparsify.step gets the batch's training loss (what training_step returned, before the
    penalty), not None: semi-structured keeps the mask map of the lowest loss, and a non-finite loss
    is reported (docs/integrations.md)."""
    from sparsify.integrations.lightning import SparsifyCallback
    module = _classifier(returns_dict=False)
    _, ends, stepped = _pl_fit(module, SparsifyCallback("tl1", attr="net"), monkeypatch, max_steps=2)
    assert len(stepped) == 2 and None not in stepped
    assert stepped == pytest.approx(module.task, rel=1e-6) and stepped != pytest.approx(ends, rel=1e-6)


def test_pl_an_optimizer_of_flat_copies_still_steps_the_schedule():
    """An optimizer holding copies of the parameters, none of the module's own tensors (DeepSpeed
    ZeRO's flat partitions), still advances the schedule once per optimizer step."""
    pl = _pl()
    from sparsify.integrations.lightning import SparsifyCallback
    from test_lightning_callback_steps import Z, data, fit, mlp

    class FlatCopies(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = sparsify.sparsify(mlp(8, 1), "gmp", total_steps=3, example_inputs=Z)
            # a list: not registered, so not one of the module's parameters
            self.flat = [nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.net.parameters()]))]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y) + 0 * self.flat[0].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.flat, lr=0.01)
    module = FlatCopies()
    trainer, said = fit(module, [SparsifyCallback()], data(n=3, batch=4, target=True), max_steps=3)
    assert trainer.global_step == 3
    assert int(module.net.sparsify_state.step) == 3, said


def test_pl_a_resumed_gan_is_not_told_its_steps_differ_from_global_step(tmp_path):
    """A GAN (manual optimization, two optimizers) resumed from 5 generator steps (global_step 10):
    the generator goes on to 10 without the warning meant for automatic optimization, where
    global_step counts the module's steps (docs/integrations.md, resuming)."""
    _pl()
    from sparsify.integrations.lightning import SparsifyCallback
    from test_lightning_callback_steps import GAN, Z, data, fit, mlp
    trainer, _ = fit(GAN(gen=sparsify.sparsify(mlp(8, 4), "gmp", total_steps=10, example_inputs=Z)),
                     [SparsifyCallback()], data(n=5), max_steps=10)
    assert trainer.global_step == 10
    trainer.save_checkpoint(tmp_path / "gan.ckpt")
    module = GAN(gen=sparsify.sparsify(mlp(8, 4), "gmp", total_steps=10, example_inputs=Z))
    trainer, said = fit(module, [SparsifyCallback()], data(n=5), ckpt_path=tmp_path / "gan.ckpt", max_steps=20)
    assert trainer.global_step == 20
    assert int(module.gen.sparsify_state.step) == 10
    assert not [w for w in said if "resumes at global_step" in w], said


def test_sparsify_as_saved_leaves_a_network_sparsified_in_init_alone():
    """A module that sparsifies its network in __init__ may call sparsify_as_saved all the same:
    nothing to do, and the checkpoint loads (docs/integrations.md, load_from_checkpoint)."""
    _pl()
    from sparsify.integrations.lightning import sparsify_as_saved
    from test_lightning_callback_steps import Regressor
    checkpoint = {"state_dict": Regressor().state_dict()}
    fresh = Regressor()
    assert sparsify_as_saved(fresh, checkpoint) == []
    result = fresh.load_state_dict(checkpoint["state_dict"])
    assert (result.missing_keys, result.unexpected_keys) == ([], [])


# --- distributed -----------------------------------------------------------------------------


def _gmp(seed):
    torch.manual_seed(seed)
    return sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), "gmp", total_steps=100)


def test_fingerprints_of_different_weights_differ():
    """Two models at step 0 with the same (all-ones) masks but other weights: their fingerprints
    differ, as ranks that compute with different weights must (docs/distributed.md)."""
    a, b = _gmp(0), _gmp(1)
    assert torch.equal(a[0].mask, b[0].mask) and not torch.equal(a[0].weight, b[0].weight)
    assert state_fingerprint(a) == state_fingerprint(_gmp(0))
    assert state_fingerprint(a) != state_fingerprint(b)


def _differing_ranks(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = _gmp(rank)  # the mistake: every rank seeded differently
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        try:
            assert_synchronized(model)
            said = "passed"
        except RuntimeError as e:
            said = str(e)
        with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
            f.write(said)
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_assert_synchronized_raises_on_both_of_two_ranks_that_differ(tmp_path):
    """Two gloo ranks seeded differently: assert_synchronized raises on both, naming rank 1
    (docs/distributed.md: seed every rank the same)."""
    spawn(_differing_ranks, str(tmp_path))
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert said.startswith("sparsify state differs between ranks (ranks [1] differ from rank 0)"), (rank, said)
