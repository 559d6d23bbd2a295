"""What ``sparsify train`` reads from a model's output: the class logits.

A built-in or torchvision model returns them as a tensor; a transformers classifier (a
``package.module:factory`` returning ``ResNetForImageClassification``, ...) returns a
``ModelOutput`` whose ``logits`` hold them, and torchvision's GoogLeNet / Inception a named tuple
with ``logits`` in training. A plain tuple or list is refused: which item holds the logits is
not written on it (``(logits, aux)``, ``(features, logits)``, transformers' ``return_dict=False``
puts a loss first when given labels), and a wrong guess would train on the wrong tensor.

>>> logits_of(torch.zeros(2, 10)).shape, logits_of({"logits": torch.zeros(2, 3)}).shape
(torch.Size([2, 10]), torch.Size([2, 3]))
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["logits_of", "check_output"]

WANTED = ("a (batch, classes) tensor of logits, or an output with a logits field holding one "
          "(a transformers ModelOutput, a dict with 'logits')")


def _logits_or_none(out):
    if isinstance(out, torch.Tensor):
        return out
    found = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return found if isinstance(found, torch.Tensor) else None


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output ``out`` (see the module docstring); a one-line
    ``ValueError`` for any other output.

    >>> from collections import namedtuple
    >>> logits_of(namedtuple("Out", "logits aux")(torch.ones(1, 2), None)).tolist()
    [[1.0, 1.0]]
    >>> logits_of((torch.zeros(1, 2),))
    Traceback (most recent call last):
    ValueError: the model returned a tuple; sparsify train needs a (batch, classes) tensor of logits, or an output with a logits field holding one (a transformers ModelOutput, a dict with 'logits')
    """
    found = _logits_or_none(out)
    if found is None:
        raise ValueError(f"the model returned {_kind(out)}; sparsify train needs {WANTED}")
    return found


def check_output(model, example: tuple, num_classes: int, name: str, size_hint: str = "") -> None:
    """Run ``model`` on ``example`` (eval mode, no gradients; the mode it had is restored) and
    refuse, in one line naming ``name`` (``--model``), inputs it cannot take (``size_hint``: what
    sets their size) and an output training cannot read: no logits (:func:`logits_of`), logits
    that are not (batch, classes), or fewer classes than the data has. Called before the model is
    sparsified: the user hears it before anything is written.

    >>> check_output(torch.nn.Linear(4, 3), (torch.zeros(2, 4),), 10, "mine:factory")
    Traceback (most recent call last):
    ValueError: model 'mine:factory' outputs 3 classes (logits of shape [2, 3]); the data has 10
    >>> check_output(torch.nn.Linear(5, 3), (torch.zeros(2, 4),), 3, "mine:factory", "--image-size sets it")
    Traceback (most recent call last):
    ValueError: model 'mine:factory' cannot take the data's inputs, shape [2, 4]: RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x4 and 5x3); --image-size sets it
    """
    from sparsify.core.modes import kept_modes
    with torch.no_grad(), kept_modes(model, training=False):
        try:
            out = model(*example)
        except Exception as e:  # the model's own assertion or shape error, said in one line
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"model {name!r} cannot take the data's inputs, shape {list(example[0].shape)}: "
                             f"{type(e).__name__}: {first}" + (f"; {size_hint}" if size_hint else "")) from None
    try:
        logits = logits_of(out)
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}") from None
    shape = list(logits.shape)
    if logits.dim() != 2 or shape[0] != len(example[0]):
        raise ValueError(f"model {name!r}: its logits have shape {shape} for a batch of {len(example[0])}; "
                         f"sparsify train needs {WANTED}")
    if shape[1] < num_classes:
        raise ValueError(f"model {name!r} outputs {shape[1]} classes (logits of shape {shape}); "
                         f"the data has {num_classes}")


def _kind(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__}"
    if isinstance(out, Mapping):
        return f"{type(out).__name__} without a 'logits' tensor (keys: {', '.join(map(str, list(out)[:6]))})"
    return type(out).__name__
