"""What ``sparsify.measure`` gives the model from each batch (a tensor, an ``(inputs, targets)``
pair, a tokenizer's dict, or what ``input_fn`` returns), and its one-line errors for arguments
that would otherwise fail deep inside or be iterated wrongly."""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import nn

from passes.call_inputs import positional_inputs
from sparsify.prepare.inputs import describe_inputs


_BATCHES = "measure: batches is an iterable of batches (a DataLoader or a list)"


def _check_arguments(batches, input_fn, max_batches) -> None:
    """One-line errors for arguments that would otherwise fail deep inside, or be iterated wrongly
    (a tensor iterates over its rows: each row would count as a batch)."""
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{_BATCHES}; got one Tensor of shape {tuple(batches.shape)}: pass [x]")
    if isinstance(batches, Mapping):
        raise TypeError(f"{_BATCHES}; got one {type(batches).__name__} (keys {', '.join(map(str, batches))}): "
                        "pass [batch]")
    if isinstance(batches, (str, bytes)) or not any(hasattr(type(batches), a) for a in ("__iter__", "__getitem__")):
        raise TypeError(f"{_BATCHES}; got {type(batches).__name__}")
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"measure: input_fn is a function of a batch returning the model's positional inputs; got "
                        f"{type(input_fn).__name__}")
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
            raise TypeError(f"measure: max_batches is how many batches to run, an int >= 1 (or None: all of them); "
                            f"got {type(max_batches).__name__} {max_batches!r}")
        if max_batches < 1:
            raise ValueError(f"measure: max_batches is how many batches to run, an int >= 1 (or None: all of them); "
                             f"got {max_batches}")


def _bound(model: nn.Module, inputs: Mapping) -> tuple:
    """Keyword inputs as forward's positional ones, as ``sparsify(example_inputs=dict)`` binds them."""
    args = positional_inputs(model, inputs, "measure: batches")
    return (args,) if isinstance(args, Mapping) else tuple(args)


def _default_inputs(model: nn.Module, batch) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):  # a tokenizer's or HF collator's batch: what model(**batch) takes
        return _bound(model, batch)
    if isinstance(batch, (list, tuple)) and batch:
        # (inputs, targets) as DataLoaders yield them
        return _bound(model, batch[0]) if isinstance(batch[0], Mapping) else (batch[0],)
    raise TypeError(f"measure: cannot take model inputs from a {type(batch).__name__}; pass input_fn")


def _given_inputs(model: nn.Module, got) -> tuple:
    """What ``input_fn`` returned as positional inputs: a tuple or list is them, a tensor the one,
    a dict keyword inputs."""
    if isinstance(got, (tuple, list)):
        return tuple(got)
    if isinstance(got, torch.Tensor):
        return (got,)
    if isinstance(got, Mapping):
        return _bound(model, got)
    raise TypeError(f"measure: input_fn returned a {type(got).__name__}; return the model's positional inputs "
                    "as a tuple (or one tensor, or a dict of its keyword inputs)")


def _one_batch(batches, failed: int) -> str | None:
    """The shapes of ``batches`` when it looks like one ``(input, target)`` batch rather than
    batches: tensors of one length, the item that failed of another rank than the first, which ran."""
    if not isinstance(batches, (list, tuple)) or not 2 <= len(batches) <= 4 or failed >= len(batches) or \
            not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in batches):
        return None
    if len({t.shape[0] for t in batches}) != 1 or batches[failed].dim() == batches[0].dim():
        return None
    return describe_inputs(batches)
