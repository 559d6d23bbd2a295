"""Guards on what ``sparsify train`` (``sparsify.app``) promises and a run's numbers rely on: the seed fixes
the initialisation and each epoch's own order, the optimizer and its ``--momentum`` / ``--weight-decay`` are
the ones asked for, the history's train loss is a mean per sample, a penalty that is not finite stops the run,
``sparsify.step`` gets each step's loss, a resumed run with dropout continues bit-exactly, the settings that
may change with ``--resume`` (``--threads``, ``--device``, ``--compile``, ``--workers``) are the ones it runs
with, a second Ctrl-C aborts, the reported accuracies and sparsity are those of the saved models, and the
data reach the model as loaded (test split standardised as the train split, lazy datasets in order)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F

from sparsify.app import train as train_module
from sparsify.app.batches import _batches, _epoch_order, _train_size
from sparsify.app.checkpoint import CHECKPOINT, StopOnSigint
from sparsify.app.cli import main
from sparsify.app.data import load_data
from sparsify.app.models import build_model
from sparsify.app.train import TrainConfig, TrainingDiverged, train

QUICK = dict(model="cnn", data="digits", epochs=1, batch_size=256, progress=False, threads=1)


def ctrl_c_at(step, seen=None, record=lambda: None):
    """An ``on_step`` that presses Ctrl-C after step ``step`` (recording ``record()`` into ``seen`` first)."""
    def on_step(s):
        if seen is not None:
            seen.append(record())
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


def state(run, name="final_state_dict.pt"):
    return torch.load(run / name, weights_only=True)


def digits_test_accuracy(path) -> float:
    """Top-1 accuracy of the cnn state dict at ``path`` on the digits test split, evaluated here."""
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    x, y = load_data("digits").test.tensors
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(y)


# --- the seed, the epochs' order, the train loss ---------------------------------------------------------


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Dense runs with lr 1e-30 (their weights are the initial ones): seed 0 finished, seed 1 stopped after
    step 1."""
    root = tmp_path_factory.mktemp("frozen")
    results = {seed: train(TrainConfig(**QUICK, lr=1e-30, seed=seed, out=str(root / f"s{seed}")),
                           on_step=ctrl_c_at(1) if seed else None, quiet=True) for seed in (0, 1)}
    assert results[1]["interrupted"] and "interrupted" not in results[0]
    return root, results


def test_the_seed_fixes_the_initial_weights(frozen):
    """docs/cli.md: --seed fixes the initialisation; two seeds must start (and, untrained, end) elsewhere."""
    root, _ = frozen
    a, b = (state(root / run, CHECKPOINT)["model"] for run in ("s0", "s1"))
    torch.manual_seed(1)
    built = build_model("cnn", num_classes=10, in_channels=1, image_size=8).state_dict()
    assert not torch.equal(a["features.0.weight"], b["features.0.weight"])
    assert torch.equal(b["features.0.weight"], built["features.0.weight"])  # the initialisation of seed 1


def test_history_train_loss_is_the_mean_per_sample(frozen):
    """The history's train_loss is the epoch's mean cross-entropy per sample: here the untrained model's."""
    _, results = frozen
    data = load_data("digits")
    n = _train_size(len(data.train), 256)
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).train()  # batch statistics, as trained
    total = seen = 0.0
    with torch.no_grad():
        for x, y in _batches(data.train, _epoch_order(0, 0, len(data.train))[:n], 256):
            total += float(F.cross_entropy(model(x), y)) * len(y)
            seen += len(y)
    expected = total / seen
    assert abs(expected - math.log(10)) < 0.2  # an untrained model's loss, near ln 10
    assert results[0]["history"][0]["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_each_epoch_draws_its_own_order(tmp_path, monkeypatch):
    """docs/cli.md: --seed fixes each epoch's shuffling; epoch 2 must not repeat epoch 1's order."""
    orders, real = [], train_module._batches

    def spy(dataset, indices, *args, **kwargs):
        if len(indices) > 1000:  # the training split's order, not an evaluation's
            orders.append(indices.clone())
        return real(dataset, indices, *args, **kwargs)

    monkeypatch.setattr(train_module, "_batches", spy)
    res = train(TrainConfig(**{**QUICK, "epochs": 2, "batch_size": 512}, out=str(tmp_path / "run")),
                on_step=ctrl_c_at(4), quiet=True)  # step 4: the first of epoch 2
    assert res["interrupted"] and len(orders) == 2
    assert sorted(orders[0].tolist()) == sorted(orders[1].tolist()) == list(range(1437))
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[1], _epoch_order(0, 1, 1437))


# --- the optimizer ------------------------------------------------------------------------------------------


def test_optimizer_adamw_trains_with_decoupled_weight_decay(tmp_path):
    """docs/cli.md: --optimizer adamw is AdamW (decoupled decay), not Adam with L2 in the gradient."""
    out = tmp_path / "run"
    assert train(TrainConfig(**QUICK, optimizer="adamw", out=str(out)), on_step=ctrl_c_at(1), quiet=True)["interrupted"]
    groups = torch.load(out / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]
    assert {g["decoupled_weight_decay"] for g in groups} == {True}
    assert {g["weight_decay"] for g in groups} == {0.01}


@pytest.fixture(scope="module")
def cli_sgd_run(tmp_path_factory):
    """A finished ``sparsify train --momentum 0.5 --weight-decay 0.01`` run (1 epoch, 3 steps)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--model", "cnn", "--epochs", "1", "--batch-size", "512", "--momentum", "0.5",
                 "--weight-decay", "0.01", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    return torch.load(out / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]


def test_cli_momentum_reaches_the_optimizer(cli_sgd_run):
    """docs/cli.md: --momentum is SGD's; --momentum 0.5 must not train with the default 0.9."""
    assert {g["momentum"] for g in cli_sgd_run} == {0.5}


def test_cli_weight_decay_reaches_the_optimizer(cli_sgd_run):
    """docs/cli.md: explicit flags always win; --weight-decay 0.01 must not train with the default 5e-4."""
    assert {g["weight_decay"] for g in cli_sgd_run} == {0.01}


# --- the loop's loss --------------------------------------------------------------------------------------------


def test_a_penalty_that_is_not_finite_stops_the_run_at_its_step(tmp_path, monkeypatch):
    """A NaN penalty with a finite task loss stops the run at that step, before it poisons the weights."""
    real, calls = train_module.sp.penalty, []

    def penalty(model):
        calls.append(1)
        return real(model) + (float("nan") if len(calls) == 3 else 0.0)

    monkeypatch.setattr(train_module.sp, "penalty", penalty)
    with pytest.raises(TrainingDiverged) as e:
        train(TrainConfig(**{**QUICK, "recipe": "tl1"}, out=str(tmp_path / "run")), quiet=True)
    assert str(e.value).startswith("training diverged at step 3 (epoch 1): the loss is nan (the task loss is ")
    assert "the penalty is not finite" in str(e.value)


def test_sparsify_step_gets_each_steps_loss(tmp_path, monkeypatch):
    """semi-structured keeps the masks of the lowest loss: every sparsify.step call needs the step's loss."""
    losses, real = [], train_module.sp.step

    def step(model, loss=None):
        losses.append(loss)
        return real(model, loss=loss)

    monkeypatch.setattr(train_module.sp, "step", step)
    train(TrainConfig(**{**QUICK, "recipe": "semi-structured"}, out=str(tmp_path / "run")),
          on_step=ctrl_c_at(3), quiet=True)
    assert len(losses) == 3
    assert all(isinstance(v, torch.Tensor) and math.isfinite(float(v.detach())) for v in losses)


# --- resume ---------------------------------------------------------------------------------------------


def test_resume_of_a_model_with_dropout_is_bit_exact(tmp_path, monkeypatch):
    """docs/cli.md: the RNG state is saved, so --resume of a dropout model ends with the uninterrupted weights."""
    (tmp_path / "guards_dropout_net.py").write_text(
        "from torch import nn\n"
        "def net(num_classes=10, in_channels=1, image_size=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 32), nn.ReLU(),\n"
        "                         nn.Dropout(0.5), nn.Linear(32, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = "guards_dropout_net:net"
    cfg = lambda name: TrainConfig(**{**QUICK, "model": model, "recipe": "gmp", "epochs": 2},  # noqa: E731
                                   out=str(tmp_path / name))
    train(cfg("full"), quiet=True)
    assert train(cfg("cut"), on_step=ctrl_c_at(8), quiet=True)["interrupted"]
    train(TrainConfig(resume=str(tmp_path / "cut"), model=model, progress=False), quiet=True)
    full, cut = state(tmp_path / "full", CHECKPOINT)["model"], state(tmp_path / "cut", CHECKPOINT)["model"]
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A dense run stopped by Ctrl-C after step 2 of 6, started with threads 1 and workers 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert train(TrainConfig(**QUICK, workers=2, out=str(out)), on_step=ctrl_c_at(2), quiet=True)["interrupted"]
    return out


def resumed_copy(stopped, tmp_path):
    return shutil.copytree(stopped, tmp_path / "run")


def test_resume_runs_on_the_threads_given(stopped, tmp_path):
    """docs/cli.md: --resume DIR --threads 2 runs the rest of the run on 2 threads, not the saved 1."""
    run, seen, previous = resumed_copy(stopped, tmp_path), [], torch.get_num_threads()
    try:
        res = train(TrainConfig(resume=str(run), threads=2, progress=False),
                    on_step=ctrl_c_at(3, seen, torch.get_num_threads), quiet=True)
    finally:
        torch.set_num_threads(previous)
    assert res["interrupted"] and seen == [2]


def test_resume_uses_the_compile_backend_given(stopped, tmp_path, monkeypatch):
    """docs/cli.md: --resume DIR --compile BACKEND continues the run with that backend."""
    run, backends = resumed_copy(stopped, tmp_path), []
    monkeypatch.setattr(torch, "compile", lambda model, backend=None, **kw: (backends.append(backend), model)[1])
    res = train(TrainConfig(resume=str(run), compile="eager", progress=False), on_step=ctrl_c_at(3), quiet=True)
    assert res["interrupted"] and backends == ["eager"]


def test_resume_on_the_cpu_continues_a_gpu_run(stopped, tmp_path, monkeypatch):
    """docs/cli.md: --resume DIR --device cpu continues a GPU run (config.json says cuda) on the CPU."""
    run, asked, real = resumed_copy(stopped, tmp_path), [], train_module.resolve_device
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "device": "cuda"}))
    monkeypatch.setattr(train_module, "resolve_device", lambda name: (asked.append(name), real(name))[1])
    res = train(TrainConfig(resume=str(run), device="cpu", progress=False), on_step=ctrl_c_at(3), quiet=True)
    assert res["interrupted"] and asked == ["cpu"]


def test_resume_loads_data_with_the_workers_given(stopped, tmp_path, monkeypatch):
    """docs/cli.md: --workers may change with --resume (3 is used); without it the run's own 2 is kept."""
    seen, real = [], train_module.load_data
    monkeypatch.setattr(train_module, "load_data", lambda *a, **k: (seen.append(k.get("workers")), real(*a, **k))[1])
    for name, given in (("given", 3), ("kept", None)):
        run = shutil.copytree(stopped, tmp_path / name)
        assert train(TrainConfig(resume=str(run), workers=given, progress=False), on_step=ctrl_c_at(3),
                     quiet=True)["interrupted"]
    assert seen == [3, 2]


def test_a_second_ctrl_c_aborts_at_once():
    """docs/cli.md: the first Ctrl-C finishes the step and saves; a second one aborts at once."""
    with pytest.raises(KeyboardInterrupt):
        with StopOnSigint() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)


# --- what a finished run reports -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st3_ema(tmp_path_factory):
    """A finished 1-epoch st3 run (50% sparsity from mid-run on) with an EMA of decay 0.9."""
    out = tmp_path_factory.mktemp("st3") / "run"
    res = train(TrainConfig(**{**QUICK, "recipe": "st3", "batch_size": 64, "ema": 0.9},
                            overrides={"fix": None, "end": 0.5, "sparsity": 0.5}, out=str(out)), quiet=True)
    return out, res


def test_reported_accuracy_is_the_saved_models_in_eval_mode(st3_ema):
    """report.json's accuracy is the saved model's on the test split in eval mode (BatchNorm running stats)."""
    out, res = st3_ema
    acc = digits_test_accuracy(out / "final_state_dict.pt")
    assert res["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert res["history"][-1]["test_acc"] == pytest.approx(acc, abs=1e-9)


def test_history_ema_accuracy_is_the_emas(st3_ema):
    """docs/cli.md (--ema): each epoch's EMA test accuracy is the EMA's, not the model's."""
    out, res = st3_ema
    acc = digits_test_accuracy(out / "ema_final_state_dict.pt")
    assert res["ema"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert res["history"][-1]["ema_test_acc"] == pytest.approx(acc, abs=1e-9)


def test_history_weight_sparsity_is_the_deployed_weights(st3_ema):
    """The history's weight sparsity is that of the weights the model computes with, as the report's."""
    _, res = st3_ema
    assert res["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert res["history"][-1]["weight_sparsity"] == res["weight_sparsity"]


# --- the data ---------------------------------------------------------------------------------------------------


def test_digits_test_split_is_standardised_with_the_train_statistics():
    """The test images go through the training split's normalisation: a blank pixel is one value in both."""
    data = load_data("digits")
    train_x, test_x = data.train.tensors[0], data.test.tensors[0]
    assert float(train_x.min()) == float(test_x.min())
    assert abs(float(train_x.mean())) < 1e-5 and abs(float(test_x.mean())) > 1e-3


def test_a_lazy_dataset_is_batched_in_the_given_order():
    """A dataset that is not preloaded (an image folder) is fed in the epoch's order, as a preloaded one."""
    class Lazy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([float(i)]), i

    order = torch.tensor([7, 3, 5, 1, 0, 2, 4, 6])
    batches = list(_batches(Lazy(), order, 4))
    assert [len(y) for _, y in batches] == [4, 4]
    assert [int(v) for _, y in batches for v in y] == order.tolist()
    assert [float(v) for x, _ in batches for v in x.flatten()] == order.float().tolist()
