"""``sparsify train --resume`` refuses what would not continue the same run: a flag whose value is not
the run's (also a flag given with its parser default), data that changed, an edited
``checkpoint.json``; a finished run is left as it is; the run's time adds up over its sessions; an
``--out`` or ``--ema`` that cannot work is refused before the data loads; ``--momentum`` with Adam."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from PIL import Image
from run_folders import cli_error, snapshot

from sparsify.app import train as train_module
from sparsify.app.checkpoint import CHECKPOINT_META
from sparsify.app.cli import main
from sparsify.app.train import TrainConfig, train

QUICK = ["--threads", "1", "--no-progress"]


def images(root, per_class=6):
    """A tiny image folder: two classes of 8x8 PNGs (80/20 split: 10 train, 2 test for 6 each)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def ctrl_c_at(step):
    def on_step(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished digits run (seed 5, momentum 0.5, 1 epoch of 3 steps) and a finished image-folder run."""
    root = tmp_path_factory.mktemp("runs")
    train(TrainConfig(model="cnn", epochs=1, batch_size=512, seed=5, momentum=0.5, out=str(root / "digits"),
                      progress=False, threads=1), quiet=True)
    folder = images(root / "imgs")
    train(TrainConfig(model="cnn", data=f"imagefolder:{folder}", image_size=8, epochs=1, batch_size=4,
                      out=str(root / "images"), progress=False, threads=1), quiet=True)
    return root


def copy_run(runs, tmp_path, name="digits"):
    return shutil.copytree(runs / name, tmp_path / name)


@pytest.mark.parametrize("flag, value, run_value", [("--epochs", "10", "1"), ("--seed", "0", "5"),
                                                    ("--batch-size", "64", "512"), ("--momentum", "0.9", "0.5")])
def test_a_flag_given_with_its_default_value_is_compared_with_the_run(runs, tmp_path, capsys, flag, value,
                                                                     run_value):
    """The check compared values with the parser's defaults: --epochs 10 on a 1-epoch run was ignored."""
    run = copy_run(runs, tmp_path)
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run), flag, value, *QUICK])
    assert f"{flag} cannot change them" in err and f"the run's {flag} is {run_value}, not {value}" in err
    assert snapshot(run) == before


def test_data_given_as_the_default_is_refused_on_an_image_folder_run(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path, "images")
    err = cli_error(capsys, ["train", "--resume", str(run), "--data", "digits", *QUICK])
    assert "the run's --data is imagefolder:" in err and "not digits" in err


def test_flags_with_the_runs_own_values_are_accepted(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    argv = ["--epochs", "1", "--seed", "5", "--batch-size", "512", "--momentum", "0.5", "--data", "digits",
            "--out", str(run)]
    assert main(["train", "--resume", str(run), *argv, *QUICK]) == 0


def test_optimizer_settings_left_to_their_defaults_accept_what_they_resolved_to(runs, tmp_path, capsys):
    """The run's config stores None for them: --lr 0.05 (what it trained with) was refused as "the
    run's --lr is the default, not 0.05"."""
    run = copy_run(runs, tmp_path)
    argv = ["--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "5e-4"]
    assert main(["train", "--resume", str(run), *argv, *QUICK]) == 0
    err = cli_error(capsys, ["train", "--resume", str(run), "--lr", "0.1", *QUICK])
    assert "the run's --lr is 0.05, not 0.1" in err


def test_a_finished_run_is_left_as_it_is(runs, tmp_path, capsys):
    """It said "resuming ... at epoch 2, batch 0" and wrote report.json, plots and weights again."""
    run = copy_run(runs, tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), *QUICK]) == 0
    said = capsys.readouterr().out.strip()
    assert len(said.splitlines()) == 1 and "complete" in said and "resuming" not in said, said
    assert "(1 epoch, results in" in said, said  # one epoch, not "1 epochs"
    assert snapshot(run) == before


def test_a_finished_run_without_its_report_finishes_the_write_up(runs, tmp_path, capsys):
    """A double Ctrl-C in the write-up leaves no report.json: the resume writes it, and says so."""
    run = copy_run(runs, tmp_path)
    kept = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()
    checkpoint = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), *QUICK]) == 0
    said = capsys.readouterr().out
    assert "write-up" in said and "resuming" not in said
    report = json.loads((run / "report.json").read_text())
    assert report["history"] == kept["history"] and (run / "checkpoint.pt").read_bytes() == checkpoint


@pytest.mark.parametrize("report", [True, False], ids=["finished", "write-up missing"])
def test_an_edited_checkpoint_json_is_refused(runs, tmp_path, capsys, report):
    """A changed test accuracy passed the field checks and went into report.json."""
    run = copy_run(runs, tmp_path)
    if not report:
        (run / "report.json").unlink()
    meta = json.loads((run / CHECKPOINT_META).read_text())
    meta["history"][0]["test_acc"] = 0.999
    (run / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run), *QUICK])
    assert "checkpoint.json" in err and "edited" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("change", ["one image fewer", "one image renamed"])
def test_a_resume_on_changed_data_is_refused(tmp_path, capsys, change):
    """The 80/20 split permutes the file list: a changed folder trained on another split, silently, or
    (one step fewer an epoch) was blamed on an edited checkpoint."""
    folder = images(tmp_path / "imgs")
    out = tmp_path / "run"
    cfg = TrainConfig(model="cnn", data=f"imagefolder:{folder}", image_size=8, epochs=2, batch_size=4,
                      out=str(out), progress=False, threads=1)
    assert train(cfg, on_step=ctrl_c_at(3), quiet=True)["interrupted"]  # the end of epoch 1 of 2 (3 steps each)
    if change == "one image fewer":  # 11 images: 9 train, the 9th dropped as a batch of one, 2 steps an epoch
        (folder / "a" / "0.png").unlink()
    else:
        (folder / "a" / "0.png").rename(folder / "a" / "zz.png")
    before = snapshot(out)
    err = cli_error(capsys, ["train", "--resume", str(out), *QUICK])
    assert "the data changed" in err and "edited" not in err
    assert snapshot(out) == before


def test_the_runs_time_adds_up_over_its_sessions(tmp_path, monkeypatch):
    """report.json's seconds counted only the last session."""
    out = tmp_path / "run"
    cfg = TrainConfig(model="cnn", epochs=2, batch_size=512, out=str(out), progress=False, threads=1)

    def slow_then_stop(step):
        if step == 1:
            time.sleep(3.0)
            os.kill(os.getpid(), signal.SIGINT)
    assert train(cfg, on_step=slow_then_stop, quiet=True)["interrupted"]
    t0 = time.time()
    report = train(TrainConfig(resume=str(out), progress=False), quiet=True)
    assert 3.0 <= report["seconds"] < 3.0 + (time.time() - t0) + 30
    assert json.loads((out / "report.json").read_text())["seconds"] == report["seconds"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading data (and everything after it) records that it was reached."""
    reached = []

    def load_data(*a, **k):
        reached.append(True)
        raise KeyboardInterrupt  # stops a run that gets this far (exit 130, not 2)
    monkeypatch.setattr(train_module, "load_data", load_data)
    return reached


def test_an_occupied_out_is_refused_before_the_data_loads(runs, tmp_path, capsys, no_data):
    run = copy_run(runs, tmp_path)
    err = cli_error(capsys, ["train", "--epochs", "1", "--out", str(run), *QUICK])
    assert "holds another run" in err and not no_data


def test_a_file_in_the_out_path_is_refused_before_the_data_loads(tmp_path, capsys, no_data):
    (tmp_path / "afile").write_text("")
    err = cli_error(capsys, ["train", "--epochs", "1", "--out", str(tmp_path / "afile" / "run"), *QUICK])
    assert "is a file, not a folder" in err and not no_data


def test_an_unwritable_out_is_refused_before_the_data_loads(tmp_path, capsys, no_data, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    # root may write anywhere whatever the mode: the folder says it is read-only instead
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) else access(p, mode, **k))
    err = cli_error(capsys, ["train", "--epochs", "1", "--out", str(locked / "run"), *QUICK])
    assert "not writable" in err and str(locked) in err and not no_data
    assert not (locked / "run").exists()


def test_an_ema_out_of_range_is_refused_before_the_data_loads(tmp_path, capsys, no_data):
    err = cli_error(capsys, ["train", "--epochs", "1", "--ema", "1.5", "--out", str(tmp_path / "o"), *QUICK])
    assert "--ema 1.5" in err and not no_data and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--optimizer", "adam", "--momentum", "0.5"],
                                  ["--optimizer", "adamw", "--momentum", "0.9"],
                                  ["--recipe", "RECIPE", "--momentum", "0.5"]],
                         ids=["adam", "adamw given the default", "adam from the recipe"])
def test_momentum_with_adam_is_refused(tmp_path, capsys, argv, no_data):
    """It was accepted and had no effect."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3"}],
                                  "options": {"train": {"optimizer": "adam"}}}))
    argv = [str(recipe) if a == "RECIPE" else a for a in argv]
    err = cli_error(capsys, ["train", "--epochs", "1", *argv, "--out", str(tmp_path / "o"), *QUICK])
    assert "--momentum" in err and "optimizer is adam" in err and not no_data


@pytest.mark.parametrize("then", ["kept", "edited", "moved", "commented"])
def test_a_run_resumes_with_its_own_recipe_whatever_became_of_the_file(then, tmp_path, capsys):
    """An edited recipe file (the next experiment's sparsity, options.train.lr) made a run un-resumable
    ("checkpoint.pt does not fit the model ..."), a moved one too ("does not exist"): the run goes on
    with the recipe its checkpoint saved, overrides applied, and says so in one line."""
    path = tmp_path / "mine.json"
    doc = {"version": 1, "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "magnitude",
                                    "params": {"sparsity": 0.8}}], "options": {"train": {"lr": 0.04}}}
    path.write_text(json.dumps(doc))
    out = tmp_path / "run"
    cfg = TrainConfig(model="cnn", recipe=str(path), overrides={"sparsity": 0.7}, epochs=2, batch_size=512,
                      out=str(out), progress=False, threads=1)
    assert train(cfg, on_step=ctrl_c_at(2), quiet=True)["interrupted"]
    if then == "edited":
        doc["rules"][0]["params"]["sparsity"], doc["options"]["train"]["lr"] = 0.9, 0.5
        path.write_text(json.dumps(doc))
    elif then == "moved":
        path.rename(tmp_path / "elsewhere.json")
    elif then == "commented":  # nothing that runs changed: no note
        doc["description"], doc["rules"][0]["comment"] = "first try", "0.8 was too much"
        path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), *QUICK]) == 0
    err = capsys.readouterr().err.strip()
    if then in ("kept", "commented"):
        assert err == "", err
    else:
        since = "changed since the run started" if then == "edited" else "no longer exists"
        assert err == (f"warning: recipe file {path} {since}; resuming with the run's own recipe (saved in "
                       f"{out / 'checkpoint.pt'})"), err
    report = json.loads((out / "report.json").read_text())
    assert report["optimizer"]["lr"] == 0.04 and report["report"]["recipe"] == "mine"
    assert report["weight_sparsity"] == pytest.approx(0.7, abs=0.01)


def test_a_checkpoint_without_a_saved_recipe_reads_the_recipe_again():
    """A model state without sparsify's saved recipe: the recipe is read from cfg.recipe, as before."""
    from sparsify.app.config import run_recipe
    assert run_recipe(TrainConfig(recipe="st3", resume="run"), {"model": {"fc.weight": None}}) == (None, None)


def test_an_interrupted_factory_run_is_told_the_command_that_resumes_it(tmp_path, monkeypatch, capsys):
    """It said "continue with: sparsify train --resume OUT", which then refused to import the run's
    model unless --model names it."""
    (tmp_path / "resume_factory.py").write_text(
        "import torch\n"
        "def net(num_classes, in_channels):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 64, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    cfg = TrainConfig(model="resume_factory:net", epochs=2, batch_size=512, out=str(out), progress=False, threads=1)
    assert train(cfg, on_step=ctrl_c_at(2))["interrupted"]
    said = capsys.readouterr().out
    assert f"continue with: sparsify train --resume {out} --model resume_factory:net" in said, said
    assert main(["train", "--resume", str(out), "--model", "resume_factory:net", *QUICK]) == 0
