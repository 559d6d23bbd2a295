"""Guards on the support modules of the ``sparsify`` command (``sparsify.app``) that a mutation probe found
unguarded, part 2 (what a run reports and writes): a dense run's summary numbers and layer plot, the weight
sparsity of a sparse run, a failed finalize said and recorded, the EMA file and report of a resumed dense
run, ``--out`` folders (a config-only folder reused, ``--overwrite``'s ``.overwritten`` folder), checkpoint
descriptions (impossible values named, edits seen), and the demo's folder, table and row order. Part 1 is
test_app_guards_more.py."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

# --- a dense run's numbers ---------------------------------------------------------------------------------


def test_a_dense_models_summary_counts_its_zero_weights():
    """A dense run reports the zeros of its Conv/Linear weights, non-zero-weight MACs below dense MACs, and
    executes every dense MAC (nothing is skipped without a recipe)."""
    from sparsify.app.summary import summarize
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[:4] = 0  # 16 of 32 weights
    act = {"activation_sparsity": 0.0, "effective_macs": 10.0}
    s = summarize(model, True, (torch.zeros(1, 4),), act)
    assert s["weight_sparsity"] == pytest.approx(16 / 48)
    assert (s["dense_macs"], s["nonzero_macs"], s["executed_macs"]) == (48, 32, 48)
    assert s["effective_macs"] == 10


def test_accuracy_is_correct_over_all_samples():
    """evaluate: the share of correct top-1 answers, exactly (and 0 on no data)."""
    from sparsify.app.summary import evaluate
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert evaluate(model, [(x, torch.tensor([0, 1, 1, 1]))]) == 0.75
    assert evaluate(model, []) == 0.0


# --- run folders ---------------------------------------------------------------------------------------------


def test_a_folder_holding_only_a_config_is_reused(tmp_path):
    """docs/cli.md: an --out holding only the config.json of a run stopped before its first checkpoint is
    reused (no --overwrite needed); with a checkpoint too it is refused."""
    from sparsify.app.resume import check_out
    (tmp_path / "config.json").write_text("{}")
    assert check_out(tmp_path, overwrite=False) == []
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holds another run"):
        check_out(tmp_path, overwrite=False)


def test_overwrite_replaces_an_ema_runs_files_too(tmp_path):
    """--overwrite moves every file of the old run aside, ema_final_state_dict.pt included: none of it is left
    mixed with the new run's files."""
    from sparsify.app.replace import ASIDE, Replacing
    for name in ("report.json", "ema_final_state_dict.pt"):
        (tmp_path / name).write_text("old")
    with Replacing() as r:
        r.claim(tmp_path, overwrite=True)
        assert sorted(p.name for p in (tmp_path / ASIDE).iterdir()) == ["ema_final_state_dict.pt", "report.json"]
        assert not (tmp_path / "ema_final_state_dict.pt").exists()
        r.saved()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_replacements_leftovers_are_removed(tmp_path):
    """OUT/.overwritten left by a replacement killed outright goes with the next run in that folder."""
    from sparsify.app.replace import ASIDE, Replacing
    (tmp_path / ASIDE).mkdir()
    (tmp_path / ASIDE / "report.json").write_text("old")
    with Replacing() as r:
        r.claim(tmp_path, overwrite=False)
    assert not (tmp_path / ASIDE).exists()


def test_a_failed_replacement_leaves_none_of_the_new_runs_files(tmp_path):
    """When the new run fails before its first checkpoint, the folder holds the old run only: the new run's
    own files (here a checkpoint.json the old run did not have) are removed."""
    from sparsify.app.replace import Replacing
    (tmp_path / "report.json").write_text("old")
    with pytest.raises(RuntimeError):
        with Replacing() as r:
            r.claim(tmp_path, overwrite=True)
            (tmp_path / "config.json").write_text("new")
            (tmp_path / "checkpoint.json").write_text("new")
            raise RuntimeError("diverged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "old"


# --- the demo ----------------------------------------------------------------------------------------------


def test_the_demo_refuses_a_folder_of_train_runs_and_reuses_its_own(tmp_path):
    """A folder whose runs the demo did not write is refused; a folder the demo marked is the demo's."""
    from sparsify.app.demo import MARKER, _claim_demo_out
    (tmp_path / "mine" / "st3").mkdir(parents=True)
    (tmp_path / "mine" / "st3" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="runs the demo did not write"):
        _claim_demo_out(tmp_path / "mine")
    (tmp_path / "demo" / "st3").mkdir(parents=True)
    (tmp_path / "demo" / "st3" / "config.json").write_text("{}")
    (tmp_path / "demo" / MARKER).write_text("")
    _claim_demo_out(tmp_path / "demo")  # an earlier demo's folder whose comparison was not written yet


def test_a_failed_row_has_every_column_of_the_table():
    """The demo's table stays a table when a recipe fails: its row has as many cells as the header."""
    from sparsify.app.demo import format_table
    ok = {"name": "dense", "error": None, "seconds": 1.0, "accuracy": 0.9, "weight_sparsity": 0.0,
          "activation_sparsity": 0.5, "params": 10, "nonzero_params": 10, "dense_macs": 100, "nonzero_macs": 100,
          "effective_macs": 50, "executed_macs": 100, "achieved": {}}
    bad = {"name": "st3", "error": "ValueError: boom", "seconds": 0.5, "accuracy": None}
    table = format_table([ok, bad]).splitlines()
    assert table[0].count("|") == table[2].count("|") == table[3].count("|")
    assert "failed" in table[3] and "st3: ValueError: boom" in table[-1]


def test_the_demo_runs_dense_first_then_the_recipes(tmp_path, monkeypatch):
    """The dense reference comes first even when --recipes names only sparse ones, and each run once."""
    from sparsify.app import demo
    ran = []

    def fake_train(cfg, quiet=False):
        ran.append(cfg.recipe)
        raise RuntimeError("not trained here")
    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "plot_comparison", lambda *a, **k: None, raising=False)
    import sparsify.app.plots as plots
    monkeypatch.setattr(plots, "plot_comparison", lambda *a, **k: None)
    rows = demo.run_demo(str(tmp_path / "d"), epochs=1, recipes=["st3", "dense", "st3"], quiet=True)
    assert ran == [None, "st3"] and [r["name"] for r in rows] == ["dense", "st3"]


def test_the_demo_says_warning_in_the_singular_for_one():
    from sparsify.app.demo import _warned
    from pathlib import Path
    assert _warned(["a"], Path("r")) == "  (1 warning: r/report.json)"
    assert _warned(["a", "b"], Path("r")) == "  (2 warnings: r/report.json)"



def test_the_demo_says_epoch_and_run_in_the_singular_for_one(tmp_path, monkeypatch, capsys):
    """One epoch of one run read "1 epochs per run, 1 runs" and "1 runs in"."""
    from sparsify.app import demo

    def fake_train(cfg, quiet=False):
        raise RuntimeError("not trained here")
    monkeypatch.setattr(demo, "train", fake_train)
    import sparsify.app.plots as plots
    monkeypatch.setattr(plots, "plot_comparison", lambda *a, **k: None)
    demo.run_demo(str(tmp_path / "d"), epochs=1, recipes=["dense"])
    out = capsys.readouterr().out
    assert "1 epoch per run, 1 run ->" in out and "\n1 run in " in out, out


def test_the_demo_says_epochs_in_the_plural(tmp_path, monkeypatch, capsys):
    """Eight epochs read "8 epoches per run": the plural added "es" to every word ending in "ch"."""
    from sparsify.app import demo
    monkeypatch.setattr(demo, "train", lambda cfg, quiet=False: (_ for _ in ()).throw(RuntimeError("not trained")))
    import sparsify.app.plots as plots
    monkeypatch.setattr(plots, "plot_comparison", lambda *a, **k: None)
    demo.run_demo(str(tmp_path / "d"), epochs=8, recipes=["dense", "st3"])
    out = capsys.readouterr().out
    assert "8 epochs per run, 2 runs ->" in out, out

# --- the write-up ------------------------------------------------------------------------------------------


def test_a_failed_finalize_is_said_and_recorded(tmp_path, monkeypatch):
    """docs/cli.md: if finalize fails, report.json says why; the run's output says so too, as a warning line,
    and no final_state_dict.pt is written from it."""
    from sparsify.app import results
    def boom(model, example):
        raise RuntimeError("cannot fold this layer")
    monkeypatch.setattr(results.sp, "finalize", boom)
    lines = []
    got = results._save_finalized(nn.Linear(2, 2), (torch.zeros(1, 2),), tmp_path / "final_state_dict.pt",
                                  lines.append, "finalize")
    assert got == "failed: RuntimeError: cannot fold this layer"
    assert lines == ["warning: finalize failed: cannot fold this layer"]
    assert not (tmp_path / "final_state_dict.pt").exists()


@pytest.fixture(scope="module")
def dense_ema_run(tmp_path_factory):
    """A short dense run with an EMA, stopped by Ctrl-C after step 1 and resumed; the per-layer values its
    write-up plotted in layers.png recorded."""
    from sparsify.app import plots
    from sparsify.app.train import TrainConfig, train
    out = tmp_path_factory.mktemp("dense") / "run"
    plotted = {}

    def record(weight, activation, path, *a, **k):
        plotted.update(weight=dict(weight), activation=dict(activation))
        return str(path)
    def ctrl_c(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
    first = train(TrainConfig(model="cnn", data="digits", epochs=1, batch_size=512, progress=False, threads=1,
                              ema=0.5, out=str(out)), on_step=ctrl_c, quiet=True)
    assert first.get("interrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "plot_layers", record)
        res = train(TrainConfig(resume=str(out), progress=False), quiet=True)
    return out, res, plotted


def test_a_dense_runs_layer_plot_shows_sparsity_not_density(dense_ema_run):
    """layers.png of a dense run plots each layer's fraction of zero weights: ~0 for trained dense weights."""
    _, _, plotted = dense_ema_run
    assert set(plotted["weight"]) == {"features.0", "features.3", "features.7", "fc"}
    assert all(v < 0.01 for v in plotted["weight"].values()), plotted["weight"]


def test_a_dense_runs_ema_file_holds_the_averaged_models_weights(dense_ema_run):
    """ema_final_state_dict.pt of a dense run loads into the model itself (no AveragedModel wrapper keys)."""
    from sparsify.app.models import build_model
    out, _, _ = dense_ema_run
    state = torch.load(out / "ema_final_state_dict.pt", weights_only=True)
    build_model("cnn", num_classes=10, in_channels=1, image_size=8).load_state_dict(state)


def test_the_report_records_a_run_as_started_not_resumed(dense_ema_run):
    """report.json's config is the run's settings, the same however many sessions it took: resume is null
    also in a run finished by --resume."""
    out, _, _ = dense_ema_run
    assert json.loads((out / "report.json").read_text())["config"]["resume"] is None


def test_a_sparse_runs_weight_sparsity_counts_only_the_sparsified_layers():
    """In a sparse run the epoch lines' weight sparsity is that of the weights the recipe sparsifies: a layer
    left dense (here an all-zero one) does not count."""
    import sparsify
    from sparsify.app.summary import weight_sparsity
    torch.manual_seed(0)
    sparse = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "st3", total_steps=10)
    left_dense = nn.Linear(2, 2)
    with torch.no_grad():
        left_dense.weight.zero_()
    alone = weight_sparsity(sparse, False)
    assert weight_sparsity(nn.Sequential(sparse, left_dense), False) == alone
    assert weight_sparsity(nn.Sequential(sparse, left_dense), True) > alone  # a dense run counts every layer


# --- checkpoint descriptions -------------------------------------------------------------------------------


def _meta(**change):
    from sparsify.app.resume import checkpoint_meta
    fields = dict(epoch=1, batch=0, history=[{"epoch": 1, "test_acc": 0.5}],
                  running={"loss": 0.0, "correct": 0, "seen": 0}, seconds=3.0)
    return checkpoint_meta(**{**fields, **change})


@pytest.mark.parametrize("change, said", [
    (dict(seconds=float("inf")), "seconds inf (not a time)"),
    (dict(running={"loss": -1.0, "correct": 0, "seen": 0}), "running totals that are not numbers"),
    (dict(running={"loss": 0.0, "correct": 0, "seen": -3}), "running totals that are not numbers"),
])
def test_an_impossible_time_or_running_total_is_named(change, said):
    """checkpoint.json's run time must be finite and its running totals non-negative: what is wrong is named."""
    from sparsify.app.checkpoint import meta_problem
    assert meta_problem(_meta()) is None
    assert meta_problem(_meta(**change)) == said


def test_an_edited_description_differs_from_the_digest_kept_with_the_tensors():
    """checkpoint.pt keeps a digest of checkpoint.json: an edited accuracy is seen, the unedited one is not."""
    from sparsify.app.checkpoint import meta_digest
    from sparsify.app.resume import JSON_DIGEST, meta_edited
    meta = _meta()
    tensors = {"scheduler": {JSON_DIGEST: meta_digest(meta)}}
    assert not meta_edited(tensors, meta)
    edited = json.loads(json.dumps(meta))
    edited["history"][0]["test_acc"] = 0.99
    assert meta_edited(tensors, edited)


def test_the_comparison_plot_is_drawn_when_the_dense_run_failed(tmp_path):
    """A failed run (the dense reference too) has no accuracy: the plot leaves it out instead of failing."""
    from sparsify.app.plots import plot_comparison
    rows = [{"name": "dense", "error": "RuntimeError: boom", "accuracy": None},
            {"name": "st3", "error": None, "accuracy": 0.9, "dense_macs": 100, "nonzero_macs": 10,
             "effective_macs": 5}]
    plot_comparison(rows, tmp_path / "comparison.png", "t")
    assert (tmp_path / "comparison.png").stat().st_size > 0
