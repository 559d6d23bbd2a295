"""Checkpoints in the layer layouts of the methods' official code (docs/methods/st3.md, str.md).

The sparsified model keeps each layer's qualified name and its ``weight``; only the per-layer
method state is laid out differently from the authors' code:

* **ST-3** (vanderschuea/stthree, ``PrunedLayer``): ``th`` shape ``[1]`` (τ_l; ≤ 0 is dense),
  ``mask`` float 0/1 of the weight's shape, ``scale`` ``(Cout, 1, ...)``, ``fixed`` bool ``[1]``,
  and no bias (the official layers have none). Ours: ``tau`` ``()``, ``mask`` bool, ``scale``
  ``(Cout,)``, ``fixed`` ``()``, the bias kept.
* **STR** (RAIVNLab/STR, ``STRConv``): ``sparseThreshold`` shape ``[1, 1]`` (s). Ours: ``s`` ``(1,)``
  (``granularity="layer"``), ``(Cout, 1, ...)`` for ``"channel"`` (saved as is), or one shared
  scalar on the group for ``"global"`` (saved into every layer; loaded back only when all agree).
  The official classifier is a 1x1 conv: a ``(out, in, 1, 1)`` weight loads into a ``Linear``.
* **SAS** needs nothing: its weight already has the official interleaved layout.

:func:`load_official_state_dict` translates an official state_dict and loads it (a layer of ours
whose bias the checkpoint lacks gets a zero bias: the official forward has none);
:func:`to_official_state_dict` writes one. Other keys pass through unchanged; this library's own
``sparsify_state`` (step counter, group thresholds) is neither expected nor written.

>>> import torch, sparsify
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False))
>>> m = sparsify.sparsify(net, "st3", sparsity=0.5, begin=0, end=0, fix=None)
>>> sd = to_official_state_dict(m)
>>> sorted(sd), tuple(sd["0.th"].shape), sd["0.mask"].dtype
(['0.fixed', '0.mask', '0.scale', '0.th', '0.weight'], (1,), torch.float32)
>>> load_official_state_dict(m, sd)
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsify.core.state import STATE_ATTR, find_state
from sparsify.methods.st3 import ST3Group, ST3Mixin
from sparsify.methods.str import STRGroup, STRMixin

__all__ = ["to_official_state_dict", "load_official_state_dict"]


def _is_state_key(key: str) -> bool:
    return STATE_ATTR in key.split(".")


def _layers(model: nn.Module):
    return [(f"{n}." if n else "", m) for n, m in model.named_modules() if isinstance(m, (ST3Mixin, STRMixin))]


@torch.no_grad()
def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ST-3 and STR layer in its official layout (module
    docstring). A non-zero bias of an ST-3 layer has no official place: it is kept under its
    name, with a warning (the official code would need ``strict=False`` and drop it).

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1)), "str")
    >>> to_official_state_dict(m)["0.sparseThreshold"].shape
    torch.Size([1, 1])
    """
    sd = {k: v for k, v in model.state_dict().items() if not _is_state_key(k)}
    kept_bias = []
    for p, m in _layers(model):
        w = m.weight
        if isinstance(m, ST3Mixin):
            for key in ("tau", "mask", "scale", "fixed"):
                sd.pop(p + key)
            sd[p + "th"] = m.tau.detach().to(w.dtype).reshape(1).clone()
            sd[p + "mask"] = m.mask.to(w.dtype)
            sd[p + "scale"] = m.scale.detach().reshape(m.out_shape()).clone()
            sd[p + "fixed"] = m.fixed.detach().reshape(1).clone()
            if m.bias is not None:
                if bool((m.bias != 0).any()):
                    kept_bias.append(p + "bias")
                else:
                    sd.pop(p + "bias")
        else:
            s = m.threshold_param().detach().float()
            sd.pop(p + "s", None)
            sd[p + "sparseThreshold"] = s.reshape(1, 1).clone() if s.dim() <= 1 else s.clone()
    if kept_bias:
        warnings.warn(f"to_official_state_dict: {len(kept_bias)} ST-3 layer(s) have a non-zero bias "
                      f"({', '.join(kept_bias[:3])}{' ...' if len(kept_bias) > 3 else ''}), which the official "
                      "layers do not have: kept under their names (an official model loads them only with "
                      "strict=False, and then computes without them)", stacklevel=2)
    return sd


@torch.no_grad()
def load_official_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> None:
    """Load ``state_dict`` (official layouts for ST-3/STR layers, plain keys elsewhere) into the
    sparsified ``model``; the model then computes what the official model computes.

    ``strict``: every key must be used and every key of the model (but its ``sparsify_state``
    and the biases official layers lack) must be given; a ``ValueError`` lists what is not.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1)), "str")
    >>> load_official_state_dict(m, {"0.weight": torch.ones(3, 2, 1, 1), "0.sparseThreshold": torch.zeros(1, 1)})
    >>> float(m[0].threshold().detach()), float(m[0].bias.detach().abs().sum())
    (0.5, 0.0)
    """
    sd = dict(state_dict)
    own = model.state_dict()
    out = {k: v for k, v in own.items() if _is_state_key(k)}
    zero_bias = []
    shared: dict[int, list[torch.Tensor]] = {}
    for p, m in _layers(model):
        w = sd.get(p + "weight")
        if isinstance(w, torch.Tensor) and isinstance(m, nn.Linear) and w.dim() == 4 and w.shape[2:] == (1, 1):
            sd[p + "weight"] = w.reshape(w.shape[:2])  # the official classifier: a 1x1 conv
        if p + "weight" in sd and m.bias is not None and p + "bias" not in sd:
            zero_bias.append(p + "bias")
            sd[p + "bias"] = torch.zeros_like(m.bias)
        if isinstance(m, ST3Mixin):
            if p + "th" not in sd:
                continue  # our own layout (or missing: strict reports it)
            sd[p + "tau"] = sd.pop(p + "th").reshape(()).to(m.tau.dtype)
            sd[p + "mask"] = sd.pop(p + "mask") != 0
            sd[p + "scale"] = sd.pop(p + "scale").reshape(m.scale.shape).to(m.scale.dtype)
            sd[p + "fixed"] = sd.pop(p + "fixed").reshape(()).bool()
        elif p + "sparseThreshold" in sd:
            s = sd.pop(p + "sparseThreshold").float()
            param = m.threshold_param()
            if p + "s" in own:
                sd[p + "s"] = s.reshape(param.shape)
            else:  # global granularity: one shared s, set once below
                shared.setdefault(id(param), [param]).append(s.reshape(param.shape))
    for param, *values in shared.values():
        if any(not torch.equal(v, values[0]) for v in values):
            raise ValueError("load_official_state_dict: the checkpoint's layers have different sparseThreshold "
                             "values, but this model's STR rule shares one (granularity 'global'); sparsify "
                             "with granularity 'layer' to load it")
        param.copy_(values[0])
    unused = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and not _is_state_key(k)]
    if strict and (unused or missing):
        raise ValueError("load_official_state_dict: "
                         + (f"keys the model does not have: {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}; "
                            if unused else "")
                         + (f"keys the checkpoint lacks: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                            if missing else "")
                         + "is it a checkpoint of this architecture? (strict=False loads what matches)")
    out.update({k: v for k, v in sd.items() if k in own})
    model.load_state_dict(out, strict=False)
    _sync_groups(model)


def _sync_groups(model: nn.Module) -> None:
    """The groups' global τ from the loaded layers (reporting only: every step recomputes it)."""
    state = find_state(model, required=False)
    for g in state.groups.values() if state is not None else ():
        if isinstance(g, ST3Group) and g.members:
            name, m = next(iter(g.members.items()))
            g.tau.fill_(float(m.tau) / g.sigmas[name])
        elif isinstance(g, STRGroup):
            g._last = None  # the loaded s is not a step of the optimizer
