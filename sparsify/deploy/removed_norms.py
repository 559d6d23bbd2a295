"""Weight norms the model's class builds but a finalized model no longer holds.

sparsify leaves a layer whose weight ``weight_norm`` computes dense, and advises removing the
norm first to take the layer in (wav2vec2's and HuBERT's positional convolution). A transformers
class that builds such a layer loads its checkpoints by the norm's keys
(``...parametrizations.weight.original0`` / ``original1``, or ``weight_g`` / ``weight_v``): the
folder ``save_pretrained`` writes from the finalized model holds a plain ``weight`` there, which
``from_pretrained`` does not read, so the reloaded layer keeps no weight of the model's (its
outputs NaN in transformers 5), silently. Putting the norm back on the finalized layer restores
the class's layout and computes the same weight, its zeros kept (the direction ``v`` is the
weight, its norm ``g`` the weight's norm).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from sparsify.core.subclasses import put_back

__all__ = ["put_back", "removed_weight_norms", "warn_removed_weight_norms"]


def removed_weight_norms(model: nn.Module) -> dict[str, str]:
    """``{layer name: the call that puts its norm back}`` for each layer that a fresh model of
    ``model``'s class (built on the meta device from a copy of ``model.config``: transformers
    models) computes with ``weight_norm`` and ``model`` holds as a plain ``weight``; ``{}`` for a
    model without a config or whose class will not build from it.

    >>> removed_weight_norms(nn.Linear(2, 2))
    {}
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(type(model), "from_pretrained", None)):
        return {}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(model)(copy.deepcopy(config))  # (a class may adjust the config it gets)
    except Exception:  # a class that wants more than its config: nothing to compare against
        return {}
    found = {}
    for name, layer in fresh.named_modules():
        call = put_back(layer, f"model.{name}")
        if call is None:
            continue
        try:
            held = model.get_submodule(name)
        except AttributeError:
            continue
        if "weight" in held._parameters and put_back(held) is None:
            found[name] = call
    return found


def warn_removed_weight_norms(model: nn.Module, stacklevel: int) -> None:
    """Warn, with the call that puts each norm back, when :func:`removed_weight_norms` finds any."""
    removed = removed_weight_norms(model)
    if not removed:
        return
    calls = "; ".join(removed.values())
    warnings.warn(f"sparsify.finalize: {type(model).__name__} builds {', '.join(removed)} with weight_norm, which "
                  "this model no longer has: from_pretrained of the folder save_pretrained writes would find no "
                  "weight for it (missing keys, a layer without the trained weight). Put the norm back on the "
                  f"finalized model before save_pretrained (its zeros stay): {calls} "
                  "(docs/transformers.md#weight-normed-layers-wav2vec2)", stacklevel=stacklevel + 1)
