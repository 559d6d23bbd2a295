"""Guards on the support modules of the ``sparsify`` command (``sparsify.app``) that a mutation probe found
unguarded, part 1 (the inputs of a run): the bounds the command line and a resumed ``config.json`` are checked
against, ``--set``'s parsing, the one-line ``warning: ...`` output (quiet runs print nothing), each epoch's
own shuffle, the channel adaptation of image data, image folders (hidden folders, ``val`` before ``test``, the
80/20 split, file sizes in the fingerprint), the model builder (factories, widths, the first layer's
channels) and devices. Part 2 is test_app_guards_more_2.py."""
from __future__ import annotations

import types

import pytest
import torch
from PIL import Image
from torch import nn

from sparsify.app.batches import _channel_fixer
from sparsify.app.overrides import parse_overrides
from sparsify.app.settings import MAX_THREADS, check_settings
from sparsify.app.warning_lines import warning_lines

from image_folders import write_images


def args(**kw):
    """The argument namespace ``check_settings`` reads: every setting unset except ``kw``."""
    return types.SimpleNamespace(**kw)


# --- the settings' bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ok, bad", [
    (dict(threads=MAX_THREADS), dict(threads=MAX_THREADS + 1)),
    (dict(seed=2**32 - 1), dict(seed=2**32)),
    (dict(momentum=0.999), dict(momentum=1.0)),
    (dict(workers=0), dict(workers=-1)),
    (dict(image_size=1), dict(image_size=0)),
    (dict(weight_decay=0.0), dict(weight_decay=-1e-9)),
    (dict(lr=1e-9), dict(lr=0.0)),
])
def test_settings_are_refused_exactly_past_their_bounds(ok, bad):
    """docs/cli.md's ranges: --threads 1..1024, --seed below 2**32, momentum below 1, workers >= 0, sizes >= 1,
    weight decay may be 0 and lr may not."""
    check_settings(args(**ok))
    with pytest.raises(ValueError, match=f"--{next(iter(bad)).replace('_', '-')} must"):
        check_settings(args(**bad))


# --- --set key=value ---------------------------------------------------------------------------------------


def test_set_needs_a_key_and_strips_it():
    """``--set =0.9`` names no parameter and is refused; spaces around a key (a plain-string value too) go."""
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["=0.9"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["  =0.9"])
    assert parse_overrides([" rule =abc", " sparsity =0.5"]) == {"rule": "abc", "sparsity": 0.5}


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_set_refuses_non_finite_numbers(value):
    """JSON's NaN / Infinity constants are not numbers a recipe can use: refused, naming the item."""
    with pytest.raises(ValueError, match=f"--set sparsity={value}: .*finite"):
        parse_overrides([f"sparsity={value}"])


# --- warning lines -----------------------------------------------------------------------------------------


def test_a_quiet_run_prints_no_warning_line_but_keeps_it(capsys):
    """quiet (the demo): nothing on stderr, the message still kept for report.json."""
    import warnings
    with warning_lines(quiet=True) as seen:
        warnings.warn("fc: every weight of 6 of its 10 outputs pruned")
    assert seen == ["fc: every weight of 6 of its 10 outputs pruned"]
    assert capsys.readouterr().err == ""
    with warning_lines() as seen:
        warnings.warn("fc: every weight of 6 of its 10 outputs pruned")
    assert capsys.readouterr().err == "warning: fc: every weight of 6 of its 10 outputs pruned\n"


def test_warning_lines_leave_pythons_warning_display_as_it_was():
    """The ``warning: ...`` display lasts only for the run: afterwards Python shows warnings its own way."""
    import warnings
    before = warnings.showwarning
    with warning_lines(quiet=True):
        assert warnings.showwarning is not before
    assert warnings.showwarning is before


# --- what a run feeds the model ----------------------------------------------------------------------------


def test_no_two_seeds_share_an_epochs_order():
    """Each (seed, epoch) draws its own shuffle: runs with other seeds are not the same orders shifted by an
    epoch (seed 1's first epoch is not seed 0's second)."""
    from sparsify.app.batches import _epoch_order
    orders = {tuple(_epoch_order(seed, epoch, 50).tolist()) for seed in range(4) for epoch in range(10)}
    assert len(orders) == 40


# --- image channels ----------------------------------------------------------------------------------------


def test_colour_images_reach_a_grey_model_as_their_channel_mean():
    """A 1-channel model on RGB data sees the mean of the three channels, a 3-channel model on grey data the
    channel repeated; equal channel counts pass unchanged, others are refused."""
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(_channel_fixer(1, 3)(x), x.mean(1, keepdim=True))
    g = torch.randn(2, 1, 4, 4)
    assert torch.equal(_channel_fixer(3, 1)(g), g.expand(-1, 3, -1, -1))
    assert _channel_fixer(3, 3) is None and _channel_fixer(None, 3) is None
    with pytest.raises(ValueError, match="2-channel images and the data has 3 channels"):
        _channel_fixer(2, 3)


# --- image folders -----------------------------------------------------------------------------------------





def test_hidden_folders_are_not_classes(tmp_path):
    """docs/cli.md: hidden folders such as .git are skipped: two classes, not three."""
    from sparsify.app.data import load_data
    write_images(tmp_path / "f", ["a", "b", ".git"], 3, size=6)
    d = load_data(f"imagefolder:{tmp_path / 'f'}", image_size=6)
    assert d.num_classes == 2 and len(d.train) + len(d.test) == 6


def test_one_class_folder_is_refused(tmp_path):
    """A classifier needs at least 2 class folders."""
    from sparsify.app.data import DataError, load_data
    write_images(tmp_path / "f", ["a"], 4, size=6)
    with pytest.raises(DataError, match="one class folder"):
        load_data(f"imagefolder:{tmp_path / 'f'}", image_size=6)


def test_val_is_the_test_split_before_test(tmp_path):
    """PATH/train + PATH/val, or PATH/test when there is no val: val wins when both are there."""
    from sparsify.app.data import load_data
    write_images(tmp_path / "f" / "train", ["a", "b"], 2, size=6)
    write_images(tmp_path / "f" / "val", ["a", "b"], 1, size=6)
    write_images(tmp_path / "f" / "test", ["a", "b"], 3, size=6)
    d = load_data(f"imagefolder:{tmp_path / 'f'}", image_size=6)
    assert (len(d.train), len(d.test)) == (4, 2)


def test_a_single_folder_splits_80_20(tmp_path):
    """A folder without train/val is split 80/20: 20 images give 16 to train and 4 to test."""
    from sparsify.app.data import load_data
    write_images(tmp_path / "f", ["a", "b"], 10, size=2)
    d = load_data(f"imagefolder:{tmp_path / 'f'}", image_size=2)
    assert (len(d.train), len(d.test)) == (16, 4)


def test_the_folder_fingerprint_follows_file_sizes(tmp_path):
    """An image replaced by another of a different size, same name, is a change of the data a resume sees."""
    from sparsify.app.data import fingerprint, load_data
    write_images(tmp_path / "f", ["a", "b"], 3, size=6)
    before = fingerprint(load_data(f"imagefolder:{tmp_path / 'f'}", image_size=6))
    arr = (torch.rand(9, 9, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(tmp_path / "f" / "a" / "0.png")
    after = fingerprint(load_data(f"imagefolder:{tmp_path / 'f'}", image_size=6))
    assert before["files"] == after["files"] and before["sha256"] != after["sha256"]


# --- models ------------------------------------------------------------------------------------------------


def test_a_tiny_width_keeps_one_channel_per_layer():
    """--width scales the built-ins but never to zero channels: a very small width still builds and runs."""
    from sparsify.app.models import build_model
    m = build_model("lenet5", num_classes=10, in_channels=1, image_size=28, width=0.01)
    assert m.conv1.out_channels == 1 and m(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_a_factory_taking_keyword_arguments_gets_all_of_them(tmp_path, monkeypatch):
    """A ``package.module:factory(**kw)`` receives num_classes, in_channels and image_size."""
    from sparsify.app.models import build_model
    (tmp_path / "kwfactory_probe.py").write_text(
        "import torch.nn as nn\n"
        "seen = {}\n"
        "def make(**kw):\n"
        "    seen.update(kw)\n"
        "    return nn.Linear(kw['in_channels'], kw['num_classes'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model("kwfactory_probe:make", num_classes=4, in_channels=5, image_size=1)
    import kwfactory_probe
    assert kwfactory_probe.seen == {"num_classes": 4, "in_channels": 5, "image_size": 1}
    assert m.out_features == 4


def test_a_factory_returning_no_module_is_refused(tmp_path, monkeypatch):
    """A factory that returns something other than an nn.Module is a ModelError, not a later crash."""
    from sparsify.app.models import ModelError, build_model
    (tmp_path / "badfactory_probe.py").write_text("def make():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="returned int, not an nn.Module"):
        build_model("badfactory_probe:make")


def test_width_is_refused_for_torchvision_models():
    """--width applies to the built-ins only."""
    from sparsify.app.models import ModelError, build_model
    with pytest.raises(ModelError, match="applies to the built-in models"):
        build_model("resnet18", width=2.0)


def test_a_model_starting_with_a_linear_layer_has_no_input_channels():
    """The channel adaptation looks at the first layer: a Linear first means no image channels to adapt."""
    from sparsify.app.models import input_channels
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 1))
    assert input_channels(m) is None
    assert input_channels(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Linear(2, 2))) == 3


def test_lenet5_on_20_pixel_images_is_unpadded_in_its_second_conv():
    """LeNet-5 pads its second conv only for small images (below 20 pixels): at 20 it is the classic 5x5 valid."""
    from sparsify.app.models import LeNet5
    assert LeNet5(image_size=20).conv2.padding == (0, 0) and LeNet5(image_size=12).conv2.padding == (2, 2)
    assert LeNet5(image_size=20)(torch.zeros(1, 1, 20, 20)).shape == (1, 10)


# --- devices -----------------------------------------------------------------------------------------------


def test_a_device_sparsify_train_does_not_run_on_is_refused():
    """``--device meta`` (a torch device, but no place to train) is one ValueError line."""
    from sparsify.app.device import autocast, resolve_device
    with pytest.raises(ValueError, match="runs on cpu, cuda, mps or xpu"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="--amp fp16: one of bf16"):
        autocast(torch.device("cpu"), "fp16")
