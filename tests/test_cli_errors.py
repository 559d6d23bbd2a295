"""Every user error of the ``sparsify`` command is one line on stderr and exit status 2 (before
anything is trained or written), and the library's messages for common mistakes say what to do."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sparsify
from sparsify.app.cli import main

BAD = [
    ["train", "--recipe", "st3", "--set", "end=Infinity"],
    ["train", "--recipe", "st3", "--set", "sparsity=NaN"],
    ["train", "--recipe", "st3", "--set", "sparsity=-Infinity"],
    ["train", "--recipe", "st3", "--set", "sparsity=[1,2]"],
    ["train", "--recipe", "st3", "--set", "nonexistent_key=1"],
    ["train", "--set", "sparsity=0.5"],  # --set without a recipe would be ignored
    ["train", "--recipe", "dense", "--set", "sparsity=0.5"],
    ["train", "--threads", "-1"],
    ["train", "--threads", "0"],
    ["train", "--lr", "nan"],
    ["train", "--lr", "-1"],
    ["train", "--lr", "inf"],
    ["train", "--momentum", "nan"],
    ["train", "--momentum", "1.5"],
    ["train", "--weight-decay", "inf"],
    ["train", "--weight-decay", "-0.1"],
    ["train", "--width", "0"],
    ["train", "--width", "nan"],
    ["train", "--epochs", "0"],
    ["train", "--batch-size", "-3"],
    ["train", "--image-size", "0", "--data", "imagefolder:/nonexistent"],
    ["train", "--workers", "-1"],
    ["train", "--seed", "-1"],
    ["train", "--seed", "1000000000000000"],  # overflowed in torch, after the run's folder was written
    ["demo", "--seed", str(2**32)],
    ["train", "--threads", "100000"],  # segfaulted
    ["plan", "--model", "lenet5", "--recipe", "st3", "--input-shape", "1,784"],  # a conv net takes no flat input
    ["train", "--recipe", "nope"],
    ["train", "--model", "nope"],
    ["train", "--data", "nope"],
    ["train", "--set", "=3", "--recipe", "st3"],
    ["train", "--resume", "/nonexistent/run"],
    ["plan", "--model", "resnet18", "--recipe", "st3", "--input-shape", "1,3,32"],
    ["plan", "--model", "resnet18", "--recipe", "st3", "--input-shape", "1,3,32,32,32"],
    ["plan", "--model", "cnn", "--recipe", "st3", "--input-shape", "3"],
    ["plan", "--model", "cnn", "--recipe", "st3", "--input-shape", "abc"],
    ["plan", "--model", "cnn", "--recipe", "st3", "--num-classes", "-5"],
    ["plan", "--model", "cnn", "--recipe", "/nonexistent.json"],
    ["plan", "--model", "cnn"],
    ["recipes", "--show", "nope"],
    ["demo", "--epochs", "0"],
    ["train", "--device", "gpu"],
    ["train", "--device", "tpu"],
    *([] if torch.cuda.is_available() else [["train", "--device", "cuda"]]),  # a GPU machine runs it
    ["demo", "--recipes", "st3,nope"],
    ["train", "--compile", "no_such_backend"],
    ["train", "--resume", ""],
    ["demo", "--recipes", ""],  # ran every recipe
    ["demo", "--recipes", "st3,"],
    ["train", "--image-size", "32"],  # digits are 8x8 whatever it says: it was ignored silently
    ["train", "--recipe", "st3", "--set", "end=1" + "0" * 400],
    ["train", "--model", ":factory"],
    ["train", "--model", "json:dumps"],  # a factory that raises (it needs an argument)
    *([] if hasattr(torch, "xpu") and torch.xpu.is_available() else [["train", "--device", "xpu"]]),
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_user_errors_are_one_line_and_exit_2(argv, tmp_path, capsys):
    if argv[0] in ("train", "demo") and "--resume" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sparsify {argv[0]}: error: "), err
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize("argv", [["train", "--epochs", "x"], ["bogus"], ["plan", "--capture", "nope"]])
def test_argparse_errors_are_one_line_too(argv, capsys):
    """argparse printed its usage block first, which buried the message."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: " in err and err.endswith("--help)"), err


def test_recipe_errors_name_every_unknown_key_and_the_overrides(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text('{"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3"}], "foo": 1, "bar": 2}')
    assert main(["plan", "--model", "cnn", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bar'" in err and "unknown key 'foo'" in err, err  # only 'bar' was named
    assert main(["train", "--recipe", "st3", "--set", "begin=0.6", "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("end (0.5 = step 12) is before begin (0.6 = step 14) (begin from the call's overrides)"), err


def test_a_bad_time_from_the_command_line_names_the_recipe_file(tmp_path, capsys):
    path = tmp_path / "f.json"
    path.write_text('{"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}')
    assert main(["plan", "--model", "cnn", "--recipe", str(path), "--set", "end=1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"error: {path}: $.rules[0].params.end=1.0 would be step 1" in err, err


def test_wrong_shaped_example_inputs_fail_at_sparsify_time():
    with pytest.raises(ValueError, match=r"example_inputs do not fit the model: shapes \(1, 3, 32\)"):
        sparsify.sparsify(torchvision.models.resnet18(), "st3", example_inputs=(torch.zeros(1, 3, 32),),
                          total_steps=10)
    with pytest.raises(ValueError, match="example_inputs do not fit the model"):
        sparsify.plan(nn.Sequential(nn.Linear(4, 2)), "st3", example_inputs=torch.zeros(1, 3), total_steps=10)


def test_torchscript_modules_are_refused_with_what_to_do():
    with pytest.raises(TypeError, match="not a TorchScript module.*sparsify the original module"):
        sparsify.sparsify(torch.jit.script(nn.Linear(2, 2)), "st3", total_steps=10)


def test_sparsifying_a_sparsified_model_says_what_to_do():
    model = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "st3", total_steps=10)
    with pytest.raises(ValueError, match="already sparsified.*sparsify.finalize"):
        sparsify.sparsify(model, "st3", total_steps=10)
    again = sparsify.sparsify(sparsify.finalize(model, torch.zeros(1, 4)), "st3", total_steps=10)
    assert sparsify.report(again).totals is not None  # a finalized model is plain again


@pytest.mark.parametrize("recipe,said", [
    ('{"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3", "params": [1]}]}', "params: must be"),
    ("[" * 100000, "nested too deeply"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3", "params": {"end": 1' + "0" * 400
     + '}}]}', "below 2**62"),
    ('{"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3", "params": {"end": 1' + "0" * 5000
     + '}}]}', "integer string conversion"),
])
def test_malformed_recipe_files_are_one_line(recipe, said, tmp_path, capsys):
    path = tmp_path / "r.json"
    (path.write_bytes if isinstance(recipe, bytes) else path.write_text)(recipe)
    assert main(["plan", "--model", "cnn", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err


def test_unwritable_out_and_folder_recipes_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "afile" / "run")]) == 2
    assert "Not a directory" in capsys.readouterr().err
    (tmp_path / "adir.json").mkdir()
    assert main(["plan", "--model", "cnn", "--recipe", str(tmp_path / "adir.json")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_folder_named_like_a_recipe_is_said_to_be_a_folder(tmp_path, monkeypatch, capsys):
    """--recipe recipes, a folder in the working folder, is named a folder, not an unknown recipe."""
    (tmp_path / "recipes").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--model", "cnn", "--recipe", "recipes"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'recipes' is a folder" in err and "unknown recipe" not in err, err


def test_a_file_where_a_folder_belongs_is_named_so(tmp_path, capsys):
    """They said "does not exist" and "[Errno 17] File exists"."""
    (tmp_path / "afile").write_text("")
    for argv, said in ((["train", "--out", str(tmp_path / "afile")], "--out"),
                       (["demo", "--out", str(tmp_path / "afile")], "--out"),
                       (["train", "--data", f"imagefolder:{tmp_path / 'afile'}", "--out", str(tmp_path / "o")],
                        "image folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err and "is a file, not a folder" in err, err
    assert (tmp_path / "afile").read_text() == "" and not (tmp_path / "o").exists()


def test_demo_refuses_a_folder_of_train_runs(tmp_path, capsys):
    """The demo replaces its runs' folders: a folder of `sparsify train` runs it did not write was
    overwritten silently."""
    (tmp_path / "st3").mkdir()
    (tmp_path / "st3" / "config.json").write_text("{}")
    assert main(["demo", "--out", str(tmp_path), "--recipes", "st3", "--epochs", "1"]) == 2
    assert "holds runs the demo did not write" in capsys.readouterr().err
    assert (tmp_path / "st3" / "config.json").read_text() == "{}"


def test_an_unnamed_recipe_file_is_named_after_the_file_in_the_report(tmp_path):
    import json
    path = tmp_path / "my-recipe.json"
    path.write_text(json.dumps({"version": 1, "rules": [{"match": {"type": "Conv2d"}, "method": "st3"}]}))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    m = sparsify.sparsify(net, str(path), total_steps=4, example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert sparsify.report(m).recipe == sparsify.plan(net, str(path), total_steps=4).recipe == "my-recipe"
