"""``sparsify train`` checkpoints: read as plain tensors (``weights_only=True``), hash-checked, never
importing code named in a run folder; a damaged, foreign or crafted checkpoint gives one line and
exit status 2 and changes no file; interrupted writes leave no temporary files; an ``--out`` that
holds another run is refused unless ``--resume`` or ``--overwrite``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
from run_folders import cli_error, snapshot

from sparsify.app import checkpoint as ck
from sparsify.app.checkpoint import CheckpointError
from sparsify.app.cli import main
from sparsify.app.train import TrainConfig, train

ARGS = ["--model", "cnn", "--recipe", "st3", "--epochs", "1", "--batch-size", "256", "--no-progress",
        "--threads", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch st3 run and a dense run (7 steps each)."""
    root = tmp_path_factory.mktemp("runs")
    for name, recipe in (("st3", "st3"), ("dense", None)):
        train(TrainConfig(model="cnn", recipe=recipe, epochs=1, batch_size=256, out=str(root / name),
                          progress=False, threads=1), quiet=True)
    return root


def copy_run(finished, tmp_path, name="st3"):
    dst = tmp_path / name
    shutil.copytree(finished / name, dst)
    return dst


def test_checkpoint_is_plain_tensors_with_its_hash_beside_it(finished):
    tensors = torch.load(finished / "st3" / ck.CHECKPOINT, weights_only=True)
    assert set(tensors) == {"model", "optimizer", "scheduler", "rng_torch"}
    meta = json.loads((finished / "st3" / ck.CHECKPOINT_META).read_text())
    assert meta["sha256"] == hashlib.sha256((finished / "st3" / ck.CHECKPOINT).read_bytes()).hexdigest()
    assert meta["epoch"] == 1 and meta["batch"] == 0 and meta["run"]["recipe"] == "st3"


def damage_flip(pt):
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0x01
    pt.write_bytes(bytes(data))


def damage_truncate(pt):
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])


def damage_empty(pt):
    pt.write_bytes(b"")


@pytest.mark.parametrize("damage,message", [(damage_flip, "does not match the SHA-256"),
                                            (damage_truncate, "truncated"), (damage_empty, "truncated")])
def test_a_damaged_checkpoint_is_refused_and_changes_nothing(finished, tmp_path, capsys, damage, message):
    run = copy_run(finished, tmp_path)
    damage(run / ck.CHECKPOINT)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=message):
        train(TrainConfig(resume=str(run), progress=False), quiet=True)
    err = cli_error(capsys, ["train", "--resume", str(run), "--no-progress"])
    assert message in err
    assert snapshot(run) == before


def test_a_missing_or_damaged_description_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / ck.CHECKPOINT_META).write_text("{not json")
    assert "is damaged" in cli_error(capsys, ["train", "--resume", str(run)])
    (run / ck.CHECKPOINT_META).unlink()
    assert "no checkpoint.json" in cli_error(capsys, ["train", "--resume", str(run)])


def test_a_checkpoint_of_another_run_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    for name in (ck.CHECKPOINT, ck.CHECKPOINT_META):  # a consistent pair, but of the dense run
        shutil.copy(finished / "dense" / name, run / name)
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "made by another run" in err and "recipe" in err
    assert snapshot(run) == before


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    tensors = torch.load(run / ck.CHECKPOINT, weights_only=True)
    del tensors["model"]["sparsify_state.step"]
    meta = json.loads((run / ck.CHECKPOINT_META).read_text())
    meta = {k: v for k, v in meta.items() if k not in ("format", "sha256", "size")}
    ck.save_checkpoint(tensors, meta, run)  # hash fine, contents wrong
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "does not fit the model" in err and "sparsify_state.step" in err


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_runs_no_code(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    witness = tmp_path / "code-ran"
    meta = json.loads((run / ck.CHECKPOINT_META).read_text())
    meta = {k: v for k, v in meta.items() if k not in ("format", "sha256", "size")}
    ck.save_checkpoint({"model": _RunsCode(str(witness))}, meta, run)  # with a valid hash
    assert "cannot be read as plain tensors" in cli_error(capsys, ["train", "--resume", str(run)])
    assert not witness.exists()


def test_resume_imports_no_model_code_named_in_the_run_folder(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["model"] = "rel_planted_module:make"
    (run / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, ["train", "--resume", str(run)])
    assert "--model rel_planted_module:make" in err  # says how to allow it
    assert "rel_planted_module" not in sys.modules
    # named on the command line: allowed (then the import itself fails here: no such module)
    err = cli_error(capsys, ["train", "--resume", str(run), "--model", "rel_planted_module:make"])
    assert "cannot import module 'rel_planted_module'" in err or "made by another run" in err


def test_out_holding_another_run_is_refused_unless_resume_or_overwrite(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    err = cli_error(capsys, ["train", *ARGS, "--out", str(run), "--seed", "3"])
    assert "holds another run" in err and "--overwrite" in err
    assert snapshot(run) == before
    assert main(["train", *ARGS, "--out", str(run), "--seed", "3", "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    assert json.loads((run / ck.CHECKPOINT_META).read_text())["run"]["seed"] == 3


def test_a_replacement_that_fails_before_its_first_checkpoint_gives_the_old_run_back(finished, tmp_path):
    """--overwrite keeps the replaced run aside until the new run's first checkpoint: an abort at step 2
    (a second Ctrl-C) leaves the folder as it was; a replacement that checkpoints leaves nothing aside."""
    run = copy_run(finished, tmp_path)
    before = snapshot(run)

    def abort(step):
        if step == 2:
            assert (run / ".overwritten" / ck.CHECKPOINT).exists() and not (run / ck.CHECKPOINT).exists()
            raise KeyboardInterrupt

    new = TrainConfig(model="cnn", recipe="st3", epochs=1, batch_size=256, out=str(run), progress=False,
                      threads=1, seed=3, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        train(new, on_step=abort, quiet=True)
    assert snapshot(run) == before
    train(new, quiet=True)
    assert not (run / ".overwritten").exists()
    assert json.loads((run / ck.CHECKPOINT_META).read_text())["run"]["seed"] == 3


def test_interrupted_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    ck.save_checkpoint({"w": torch.ones(2)}, {"epoch": 0}, tmp_path)
    before = snapshot(tmp_path)

    def killed(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"w": torch.zeros(2)}, {"epoch": 1}, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"w": torch.zeros(2)}, tmp_path / "other.pt")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # nothing left behind, the old checkpoint intact
    assert torch.equal(ck.load_checkpoint(tmp_path)[0]["w"], torch.ones(2))


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    stale = run / f".{ck.CHECKPOINT}.tmp99999"  # what a SIGKILL during a write leaves
    stale.write_bytes(b"partial")
    res = train(TrainConfig(resume=str(run), progress=False), quiet=True)  # already finished: 0 steps
    assert not res.get("interrupted")
    assert not stale.exists()
    assert not [p for p in os.listdir(run) if ".tmp" in p]


def test_resume_of_an_interrupted_run_still_continues(finished, tmp_path):
    # the checks above must not stop an honest resume: cut the st3 run after 3 steps and finish it
    import signal

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    out = tmp_path / "cut"
    cfg = TrainConfig(model="cnn", recipe="st3", epochs=1, batch_size=256, out=str(out), progress=False, threads=1)
    assert train(cfg, on_step=interrupt, quiet=True)["interrupted"]
    assert json.loads((out / ck.CHECKPOINT_META).read_text())["batch"] == 3
    train(TrainConfig(resume=str(out), progress=False), quiet=True)
    a = torch.load(out / ck.CHECKPOINT, weights_only=True)["model"]
    b = torch.load(finished / "st3" / ck.CHECKPOINT, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))



@pytest.mark.parametrize("edit,said", [
    ({"epoch": -5}, "epoch -5"),
    ({"epoch": 0, "batch": 1000000}, "history that is not one record"),
    ({"epoch": 0, "history": [], "batch": 1000000}, "outside its 1 epoch of 6 batches"),
    ({"epoch": "x"}, "epoch 'x'"),
    ({"history": "oops"}, "history"),
    ({"running": None}, "running totals"),
    ({"rng_python": [1, 2]}, "Python RNG state"),
    ({"rng_numpy": ["MT19937", [1, 2, 3], 0, 0, 0.0]}, "NumPy RNG state"),
])
def test_an_edited_description_is_refused_and_changes_nothing(finished, tmp_path, capsys, edit, said):
    """Only checkpoint.pt is hashed: the JSON half is checked field by field (an edited epoch
    trained "epoch -4/2" and overwrote the run; other edits crashed with a traceback)."""
    run = copy_run(finished, tmp_path)
    meta = json.loads((run / ck.CHECKPOINT_META).read_text())
    meta.update(edit)
    (run / ck.CHECKPOINT_META).write_text(json.dumps(meta))
    before = snapshot(run)
    assert said in cli_error(capsys, ["train", "--resume", str(run)])
    assert snapshot(run) == before


def test_an_edited_config_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "threads": "many"}))
    assert "threads='many'" in cli_error(capsys, ["train", "--resume", str(run)])


def test_resume_refuses_settings_it_would_ignore(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    err = cli_error(capsys, ["train", "--resume", str(run), "--epochs", "5", "--lr", "0.3"])
    assert "--epochs, --lr cannot change them" in err
