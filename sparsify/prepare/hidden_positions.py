"""Output positions per sample of layers whose weights are read outside module calls
(:mod:`sparsify.prepare.hidden`), for the MAC counts: one eval forward watched by a torch function
mode that sees which F.linear / F.conv / multi-head-attention call receives each weight."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.eval_loop import internal
from sparsify.core.modes import kept_modes

__all__ = ["hidden_positions", "record_read", "recording", "weight_owner", "MHA_IN_PROJ", "MHA_OUT_PROJ", "MHA_SEPARATE", "unreached", "mha_projections", "watched_names", "weight_numel"]

_RECORD: dict | None = None  # id(weight tensor) -> (tensor, layer) while a watch records


def record_read(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight``, noted as ``layer``'s while :func:`hidden_positions` watches."""
    if _RECORD is not None:
        _RECORD[id(weight)] = (weight, layer)  # the tensor is kept so its id is not reused
    return weight


#: positions of the packed input projection's and the output projection's weights among
#: ``F.multi_head_attention_forward``'s arguments
MHA_IN_PROJ, MHA_OUT_PROJ = 5, 11
#: the keyword arguments of ``F.multi_head_attention_forward`` (``use_separate_proj_weight=True``)
#: that carry the separate projections of the query, key and value, as the attention names them
MHA_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_PROJECTIONS = ("in_proj", "q_proj", "k_proj", "v_proj")  # MultiheadAttention's <proj>_weight parameters


def weight_owner(w, record: dict, owners: dict):
    """What ``owners`` holds for the weight tensor ``w`` handed to an op: under the layer whose
    effective weight it is (noted in ``record`` by :func:`record_read`), else under the tensor
    itself (a plain layer's parameter); None for anything else.

    >>> lin = nn.Linear(2, 2)
    >>> weight_owner(lin.weight, {}, {id(lin.weight): "fc"}), weight_owner(None, {}, {})
    ('fc', None)
    """
    if not isinstance(w, torch.Tensor):
        return None
    hit = record.get(id(w))
    return owners.get(id(hit[1]) if hit is not None else id(w))


@contextlib.contextmanager
def recording(into: dict):
    """While inside, :func:`record_read` notes each weight in ``into``: id -> (tensor, layer)."""
    global _RECORD
    previous, _RECORD = _RECORD, into
    try:
        yield into
    finally:
        _RECORD = previous


class _Watch(torch.overrides.TorchFunctionMode):
    """Counts output positions per sample of watched weights in F.linear / F.conv* calls, and of
    the projections of F.multi_head_attention_forward (its inner calls are not seen)."""

    def __init__(self, layers: dict[int, str], batch: int, record: dict):
        super().__init__()
        self.layers, self.batch, self.record, self.out = layers, batch, record, {}

    def _add(self, w, positions):
        name = weight_owner(w, self.record, self.layers)
        if name is not None:
            self.out[name] = self.out.get(name, 0.0) + positions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            # (L, N, E): L·N tokens; a cross-attention's key and value have S·N
            tokens = [x.numel() / x.shape[-1] / self.batch for x in args[:3]]
            if kwargs.get("use_separate_proj_weight"):
                for key, n in zip(MHA_SEPARATE, tokens):
                    self._add(kwargs.get(key), n)
            else:  # one weight, three row blocks, each applied to its own tokens
                self._add(args[MHA_IN_PROJ], sum(tokens) / 3)
            self._add(args[MHA_OUT_PROJ], tokens[0])
        elif func in (F.linear, F.conv1d, F.conv2d, F.conv3d) and len(args) > 1 and isinstance(result, torch.Tensor):
            self._add(args[1], result.numel() / args[1].shape[0] / self.batch)
        return result


@torch.no_grad()
def hidden_positions(root: nn.Module, example_inputs, names: list[str]) -> dict[str, float]:
    """Output positions per sample (MACs per weight element) of the layers ``names``, whose
    weights are read outside module calls, found by watching which F.linear / F.conv /
    multi-head-attention call receives their weight during one eval forward.

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.mha = mha
    ...     def forward(self, x):
    ...         return self.mha(x, x, x)[0]
    >>> hidden_positions(Net(), (torch.zeros(2, 5, 8),), ["mha.out_proj"])
    {'mha.out_proj': 5.0}
    >>> cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)  # 3 queries, 7 keys
    >>> hidden_positions(cross, (torch.zeros(1, 3, 8), torch.zeros(1, 7, 4), torch.zeros(1, 7, 4)),
    ...                  ["q_proj", "k_proj", "out_proj"])
    {'q_proj': 3.0, 'k_proj': 7.0, 'out_proj': 3.0}
    """
    if not names or example_inputs is None:
        return {}
    layers = {}
    for name in names:
        try:
            layer = root.get_submodule(name)
        except AttributeError:  # a dry run: MultiheadAttention not converted, watch its parameter
            parent, _, attr = name.rpartition(".")
            mha = root.get_submodule(parent) if parent else root
            if isinstance(mha, nn.MultiheadAttention) and attr in _PROJECTIONS \
                    and (weight := mha._parameters.get(f"{attr}_weight")) is not None:
                layers[id(weight)] = name
            continue
        layers[id(layer)] = name
        layers[id(layer.weight)] = name
    batch = next((x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    record: dict = {}
    mode = _Watch(layers, batch, record)
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with kept_modes(root, training=False), internal(), recording(record), mode:
            root(*example_inputs)
    except Exception:  # MACs are a report nicety; a model that rejects the watch keeps None
        return {}
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return mode.out


def mha_projections(root: nn.Module) -> list[str]:
    """``<name>.in_proj`` (or ``<name>.q_proj`` / ``k_proj`` / ``v_proj`` when ``kdim`` / ``vdim``
    differ from ``embed_dim``) and ``<name>.out_proj`` of every ``nn.MultiheadAttention`` of
    ``root``: ``F.multi_head_attention_forward`` reads these weights, so no module call (and no
    module hook) sees them, and MAC counts by module hooks miss them.

    >>> mha_projections(nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, kdim=4)))
    ['0.in_proj', '0.out_proj', '1.q_proj', '1.k_proj', '1.v_proj', '1.out_proj']
    """
    # the layout, not the weights: a sparse attention's in_proj_weight computes its effective weight
    return [f"{n}.{p}" if n else p for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)
            for p in (("in_proj",) if m._qkv_same_embed_dim else _PROJECTIONS[1:]) + ("out_proj",)]


def watched_names(root: nn.Module, hidden_names: list[str]) -> list[str]:
    """What :func:`hidden_positions` must watch for a MAC count of ``root``: the rewritten layers
    whose weights are read outside module calls (``hidden_names``) and every MultiheadAttention
    projection, dense ones included (:func:`mha_projections`), each once.

    >>> watched_names(nn.Sequential(nn.MultiheadAttention(8, 2)), ["0.out_proj"])
    ['0.out_proj', '0.in_proj']
    """
    return list(dict.fromkeys([*hidden_names, *mha_projections(root)]))


def unreached(root: nn.Module, positions: dict) -> list[str]:
    """Conv/Linear layers of ``root`` that have no entry in ``positions`` (what a forward's module
    hooks measured): their weights are multiplied outside their own call (a leaf module's
    ``F.linear(x, self.qkv.weight)``), or not at all.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> unreached(net, {"0": 1.0})
    ['1']
    """
    return [n for n, m in root.named_modules() if isinstance(m, WEIGHT_TYPES) and n not in positions]


def weight_numel(mods: dict[str, nn.Module], name: str) -> int | None:
    """Elements of the weight a MAC count names ``name``: a module's ``weight``, or a
    MultiheadAttention's ``in_proj_weight`` for ``<mha>.in_proj`` (``q_proj_weight`` for
    ``<mha>.q_proj``, ...); None when neither.

    >>> mha, cross = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, kdim=4)
    >>> weight_numel({"a": mha, "a.out_proj": mha.out_proj}, "a.in_proj"), weight_numel({"a": mha}, "a.x")
    (192, None)
    >>> weight_numel({"c": cross}, "c.k_proj"), weight_numel({"c": cross}, "c.in_proj")
    (32, None)
    """
    mod = mods.get(name)
    if mod is not None and isinstance(getattr(mod, "weight", None), torch.Tensor):
        return mod.weight.numel()
    parent, _, attr = name.rpartition(".")
    mha = mods.get(parent)
    weight = mha._parameters.get(f"{attr}_weight") if isinstance(mha, nn.MultiheadAttention) and \
        attr in _PROJECTIONS else None
    return None if weight is None else weight.numel()
