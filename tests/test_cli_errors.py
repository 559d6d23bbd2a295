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
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_user_errors_are_one_line_and_exit_2(argv, tmp_path, capsys):
    if argv[0] in ("train", "demo") and "--resume" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sparsify {argv[0]}: error: "), err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_wrong_shaped_example_inputs_fail_at_sparsify_time():
    with pytest.raises(ValueError, match=r"example_inputs do not fit the model: shapes \(1, 3, 32\)"):
        sparsify.sparsify(torchvision.models.resnet18(), "st3", example_inputs=(torch.zeros(1, 3, 32),),
                          total_steps=10)
    with pytest.raises(ValueError, match="example_inputs do not fit the model"):
        sparsify.plan(nn.Linear(4, 2), "st3", example_inputs=torch.zeros(1, 3), total_steps=10)


def test_torchscript_modules_are_refused_with_what_to_do():
    with pytest.raises(TypeError, match="not a TorchScript module.*sparsify the original module"):
        sparsify.sparsify(torch.jit.script(nn.Linear(2, 2)), "st3", total_steps=10)


def test_sparsifying_a_sparsified_model_says_what_to_do():
    model = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "st3", total_steps=10)
    with pytest.raises(ValueError, match="already sparsified.*sparsify.finalize"):
        sparsify.sparsify(model, "st3", total_steps=10)
    again = sparsify.sparsify(sparsify.finalize(model, torch.zeros(1, 4)), "st3", total_steps=10)
    assert sparsify.report(again).totals is not None  # a finalized model is plain again
