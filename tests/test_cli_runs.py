"""``sparsify train`` and ``sparsify demo`` run folders as the command sees them: what a finished
run leaves, what an edited run folder may not do, Ctrl-C in a run's last moments, a last batch of
one sample, paths that still hold from another working directory."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
from run_folders import cli_error, snapshot

from sparsify.app import demo as demo_module
from sparsify.app import train as train_module
from sparsify.app.checkpoint import CHECKPOINT, CHECKPOINT_META
from sparsify.app.cli import build_parser, main
from sparsify.app.config import config_from_args
from sparsify.app.train import TrainConfig, train
from sparsify.prepare.recipe import load_recipe

FAST = ["--epochs", "1", "--batch-size", "512", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A finished dense two-epoch run (3 steps an epoch)."""
    out = tmp_path_factory.mktemp("runs") / "dense"
    train(TrainConfig(model="cnn", epochs=2, batch_size=512, out=str(out), progress=False, threads=1), quiet=True)
    return out


def copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def test_a_dense_run_writes_its_final_state_dict(dense_run):
    """docs/cli.md lists final_state_dict.pt for every run; dense runs wrote none."""
    final = torch.load(dense_run / "final_state_dict.pt", weights_only=True)
    trained = torch.load(dense_run / CHECKPOINT, weights_only=True)["model"]
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)


def test_an_edited_position_that_the_checkpoint_contradicts_is_refused(dense_run, tmp_path, capsys):
    """epoch 2 -> 1 with the history trimmed passed the field checks, and the run went past total_steps."""
    run = copy_run(dense_run, tmp_path)
    meta = json.loads((run / CHECKPOINT_META).read_text())
    meta["epoch"], meta["history"] = 1, meta["history"][:1]
    (run / CHECKPOINT_META).write_text(json.dumps(meta))
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "places the run at step 3 (epoch 1, batch 0), checkpoint.pt at step 6" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("edit, said", [({"threads": -1}, "--threads must be at least 1"),
                                        ({"threads": 100000}, "--threads must be at most 1024"),
                                        ({"compile": "nope"}, "--compile nope: not a torch.compile backend"),
                                        ({"workers": -1}, "--workers must be 0 or more")])
def test_an_edited_config_value_the_command_line_refuses_is_refused(dense_run, tmp_path, capsys, edit, said):
    """Only the types were checked: a RuntimeError traceback, a dynamo traceback, a segfault."""
    run = copy_run(dense_run, tmp_path)
    (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), **edit}))
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "config.json holds a setting the command line refuses" in err and said in err
    assert snapshot(run) == before


def test_resume_names_only_the_missing_file(dense_run, tmp_path, capsys):
    run = copy_run(dense_run, tmp_path)
    (run / "config.json").unlink()
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "no config.json there" in err and "checkpoint.pt" not in err


def test_a_run_that_saved_no_checkpoint_is_started_again_in_its_folder(dense_run, tmp_path, capsys):
    """A run stopped before its first checkpoint left config.json only: a new run was refused
    ("continue it with --resume") and --resume said there was no checkpoint."""
    run = tmp_path / "early"
    run.mkdir()
    shutil.copy(dense_run / "config.json", run / "config.json")
    assert "stopped before its first checkpoint" in cli_error(capsys, ["train", "--resume", str(run)])
    assert main(["train", *FAST, "--out", str(run)]) == 0
    assert json.loads((run / CHECKPOINT_META).read_text())["epoch"] == 1
    assert "holds another run" in cli_error(capsys, ["train", *FAST, "--out", str(run)])  # now it holds one


def test_a_last_batch_of_one_sample_is_dropped(tmp_path, monkeypatch, capsys):
    """1,437 digits at batch 718: the third batch held one sample and BatchNorm failed after a whole
    epoch ("Expected more than 1 value per channel when training")."""
    (tmp_path / "bnnets.py").write_text(
        "import torch.nn as nn\n"
        "def mlp(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(),\n"
        "                         nn.Linear(16, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "--model", "bnnets:mlp", "--epochs", "2", "--batch-size", "718", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["total_steps"] == 4 and [h["step"] for h in report["history"]] == [2, 4]
    assert torch.load(out / CHECKPOINT, weights_only=True)["scheduler"]["last_epoch"] == 4


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch, capsys):
    """--recipe rec/r1.json and --data imagefolder:imgs were saved as given: --resume from another
    working directory could not find them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "r1.json").write_text(load_recipe("st3").to_json())
    assert main(["train", *FAST, "--recipe", "rec/r1.json", "--out", "run"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"] == str(tmp_path / "rec" / "r1.json")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    cfg = config_from_args(build_parser().parse_args(["train", "--data", "imagefolder:imgs", "--recipe", "st3"]))
    assert cfg.data == f"imagefolder:{tmp_path / 'elsewhere' / 'imgs'}" and cfg.recipe == "st3"


def _ctrl_c(*_):
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("when", ["last step", "write-up"])
def test_ctrl_c_at_the_end_of_a_run_stops_the_demo(tmp_path, monkeypatch, capsys, when):
    """A Ctrl-C in a run's last step or its write-up was swallowed: the next recipe started and the
    demo exited 0."""
    last = math.ceil(1437 / 64)  # the demo's steps in one epoch of digits
    if when == "last step":
        real_train = demo_module.train
        monkeypatch.setattr(demo_module, "train", lambda cfg, **kw: real_train(
            cfg, on_step=lambda step: step == last and _ctrl_c(), **kw))
    else:
        real_finish = train_module._finish
        monkeypatch.setattr(train_module, "_finish", lambda *a, **kw: (_ctrl_c(), real_finish(*a, **kw))[1])
    assert main(["demo", "--out", str(tmp_path), "--recipes", "st3", "--epochs", "1"]) == 130
    assert (tmp_path / "dense" / "report.json").is_file()  # the interrupted run's write-up completed
    assert not (tmp_path / "st3").exists() and not (tmp_path / "comparison.json").exists()
    if when == "write-up":  # `sparsify train` says so too, its outputs written
        assert main(["train", *FAST, "--out", str(tmp_path / "t")]) == 130
        assert (tmp_path / "t" / "final_state_dict.pt").is_file()
