"""What ``sparsify train`` reads from a ``package.module:factory`` model's output: its logits as a
tensor or in a ``logits`` field (a transformers ``ModelOutput``, a dict); any other output is one
line on stderr before anything is sparsified or written (docs/cli.md)."""
from __future__ import annotations

import json

import pytest

from sparsify.app.cli import main

FACTORIES = '''
import torch
from torch import nn


class Head(nn.Module):
    def __init__(self, classes, wrap):
        super().__init__()
        self.fc = nn.Linear(64, classes)
        self.wrap = wrap

    def forward(self, x):
        y = self.fc(torch.flatten(x, 1))
        if self.wrap == "dict":
            return {"logits": y}
        if self.wrap == "tuple":
            return (y, y)
        if self.wrap == "nologits":
            return {"scores": y}
        if self.wrap == "map":
            return y[:, :, None, None].expand(-1, -1, 2, 2)
        return y


def as_dict(num_classes):
    return Head(num_classes, "dict")


def as_tuple(num_classes):
    return Head(num_classes, "tuple")


def no_logits(num_classes):
    return Head(num_classes, "nologits")


def a_map(num_classes):
    return Head(num_classes, "map")


def too_few_classes():
    return Head(3, "tensor")


def wrong_size(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))  # wants 32x32 images


def hf_resnet(num_classes, in_channels):
    import transformers as T
    return T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=in_channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=num_classes, downsample_in_first_stage=False))
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "outputs_probe.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "outputs_probe"


def _train(module, factory, out, recipe="dense"):
    argv = ["train", "--model", f"{module}:{factory}", "--data", "digits", "--epochs", "1", "--out", str(out),
            "--no-progress", "--threads", "1"]
    return main(argv + ([] if recipe == "dense" else ["--recipe", recipe]))


def test_a_transformers_classifier_trains_reports_and_finalizes(factories, tmp_path, capsys):
    """ResNetForImageClassification returns an ImageClassifierOutputWithNoAttention: its logits train,
    evaluate and report (it crashed in F.cross_entropy with a traceback)."""
    pytest.importorskip("transformers", reason="the transformers classifier needs transformers installed")
    out = tmp_path / "hf"
    assert _train(factories, "hf_resnet", out, recipe="st3") == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["finalize"] == "ok" and report["accuracy"] is not None and report["weight_sparsity"] > 0.5
    assert "error" not in (report["measure"] or {})


def test_a_dict_with_logits_trains(factories, tmp_path, capsys):
    out = tmp_path / "dict"
    assert _train(factories, "as_dict", out) == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["accuracy"] > 0.2


@pytest.mark.parametrize("factory, says", [
    ("as_tuple", "returned a tuple; sparsify train needs a (batch, classes) tensor of logits"),
    ("no_logits", "returned dict without a 'logits' tensor (keys: scores)"),
    ("a_map", "its logits have shape [2, 10, 2, 2] for a batch of 2"),
    ("too_few_classes", "outputs 3 classes (logits of shape [2, 3]); the data has 10"),
    # the forward itself raised: was a traceback from inside the model (vit_b_16 on digits too)
    ("wrong_size", "cannot take the data's inputs, shape [2, 1, 8, 8]: RuntimeError: mat1 and mat2 shapes cannot "
                   "be multiplied (2x64 and 3072x10); --data digits has 8x8 images: pick a model that takes them"),
])
def test_an_output_training_cannot_read_is_one_line_before_anything_is_written(factories, factory, says,
                                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(factories, factory, out, recipe="st3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sparsify train: error: model 'outputs_probe:{factory}'"), err
    assert says in err, err
    assert not out.exists()
