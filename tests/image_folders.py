"""Image folders for the tests of the ``sparsify`` command's data sources."""
from __future__ import annotations

import torch
from PIL import Image


def write_images(folder, classes, n: int, size: int = 12) -> None:
    """``n`` random RGB PNGs of ``size`` x ``size`` under ``folder/<class>/`` for each class."""
    g = torch.Generator().manual_seed(1)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(folder / c / f"{i}.png")
