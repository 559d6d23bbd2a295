"""Semi-structured masks fit one input resolution: the one of ``example_inputs``. What tells a
training loop that runs at another one (:func:`trained_elsewhere`, checked by every
``sparsify.step``), and the detectors that choose each batch's size themselves
(:func:`resizing_transforms`, warned at ``sparsify()``)."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.methods.semistructured.mask import FIX, sizes_of

__all__ = ["trained_elsewhere", "resizing_transforms", "resizing_warning", "advice", "input_size_of"]


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def trained_elsewhere(members: dict[str, nn.Module], sized_on: str, resizing: list[str] = ()) -> str | None:
    """The one-line error when the forwards with gradients since the last step ran at another
    resolution than the masks' (every mask's conv at another output size), else None. One conv
    alone at another size is a head run on several feature levels, found on its own.

    The masks' size is the conv's output on ``example_inputs`` (``PositionMask.size``), or on the
    first forward: ``sized_on`` says which; ``resizing`` names the model's own resizing transforms
    (:func:`resizing_transforms`).

    >>> from sparsify.methods.semistructured.mask import PositionMask
    >>> m = PositionMask(layer="conv1"); m.size = (16, 16); sizes_of(m).trained = (24, 24)
    >>> trained_elsewhere({"conv1_pmask": m}, "sparsify()'s example_inputs (64x64)")[:75]
    'semi-structured: a training forward ran conv1 at output size 24x24, but its'
    """
    trained = {n: getattr(sizes_of(m), "trained", None) for n, m in members.items()}  # (None: pickled before)
    ran = [n for n, m in members.items() if not sizes_of(m).shared and m.size is not None and trained[n]]
    if not ran or any(trained[n] == members[n].size for n in ran):
        return None
    m = members[ran[0]]
    return (f"semi-structured: a training forward ran {m.layer or 'a masked conv'} at output size "
            f"{_hw(trained[ran[0]])}, but its position mask is made for {_hw(m.size)}, its size on {sized_on}: "
            f"the masks fit one input resolution; train at that resolution, or "
            f"{advice(resizing)}")


def advice(resizing: list[str]) -> str:
    """What a size error advises: example inputs at the training resolution, or, for a model that
    resizes its batches itself (:func:`resizing_transforms`), one batch size.

    >>> advice(["transform"])[:44]
    'build the detector with fixed_size=(W, H): t'
    """
    if not resizing:
        return FIX
    return f"build the detector with fixed_size=(W, H): {resizing[0]} resizes each batch to its images' aspect ratio"


def resizing_transforms(root: nn.Module) -> list[str]:
    """The submodules of ``root`` that resize each image keeping its aspect ratio and pad the batch
    (torchvision's detection ``GeneralizedRCNNTransform`` without ``fixed_size``): the size a
    batch reaches the backbone at depends on its images, not on the resolution the user chose.

    >>> import torchvision
    >>> resizing_transforms(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
    ...     weights=None, weights_backbone=None))
    ['transform']
    """
    return [name or "<root>" for name, mod in root.named_modules()
            if type(mod).__name__ == "GeneralizedRCNNTransform" and getattr(mod, "fixed_size", None) is None]


def resizing_warning(names: list[str]) -> list[str]:
    """The warning for :func:`resizing_transforms`' finding (said by ``sparsify()``).

    >>> resizing_warning(["transform"])[0][:60]
    'sparsify: semi-structured: transform (GeneralizedRCNNTransfo'
    """
    if not names:
        return []
    return [f"sparsify: semi-structured: {names[0]} (GeneralizedRCNNTransform) resizes each image to its own "
            "aspect ratio and pads the batch, so batches of other image sizes reach the backbone at other sizes, "
            "which the position masks (made at the size of example_inputs) do not fit: training stops with an error; "
            "build the detector with fixed_size=(W, H) so that every batch has one size, see "
            "docs/methods/semistructured.md"]


def input_size_of(example_inputs) -> tuple[int, int] | None:
    """The spatial size ``(H, W)`` of the first image-like (>= 3-D) example input, else None."""
    for x in example_inputs or ():
        if isinstance(x, torch.Tensor) and x.dim() >= 3:
            return int(x.shape[-2]), int(x.shape[-1])
    return None
