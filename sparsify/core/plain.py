"""The plain torch layer a sparse layer finalizes to (:func:`plain_copy`): the class of the layer it
was made from, holding the deployed weight and whatever else that layer held (its bias, a
subclass's own parameters, buffers and children), without the sparse layer's masks and
thresholds, and the hooks registered on it (they run around the plain layer's call)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from passes.hooks import share_hooks
from sparsify.core.layers import SparseWeightMixin

__all__ = ["plain_copy", "memory_format_of"]

_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format ``t`` is stored in: channels-last for a 4-d (5-d) tensor laid out so (a
    model moved with ``.to(memory_format=torch.channels_last)``), else the contiguous one; a copy
    made in it keeps the layout the convolution kernels were chosen for.

    >>> memory_format_of(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))
    torch.channels_last
    >>> memory_format_of(torch.zeros(2, 3))
    torch.contiguous_format
    """
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def plain_copy(layer: nn.Module, weight: torch.Tensor | None = None, share: bool = False) -> nn.Module:
    """A plain torch.nn layer equal to ``layer`` with ``weight`` (default: its deployed weight).
    ``share``: holding ``layer``'s own weight and bias parameters (not copies), the layer as it
    trains on without its sparsity.

    >>> lin = nn.Linear(3, 2)
    >>> type(plain_copy(lin)).__name__
    'Linear'
    """
    cls = layer.dense_class() if isinstance(layer, SparseWeightMixin) else type(layer)
    if weight is None and not share:
        weight = layer.deployed_weight() if isinstance(layer, SparseWeightMixin) else layer.weight
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    # the attributes the dense layer had (a Conv's private _reversed_padding_repeated_twice, which
    # its forward reads for reflect / circular padding and TorchScript compiles), not the sparse
    # layer's own; fresh module internals, then the layer's hooks (a pre-hook that changes the
    # input, a forward hook that reads or changes the output: the plain layer computes the same)
    dense_keys = layer.__dict__.get("_dense_keys")
    for k, v in layer.__dict__.items():
        if k in _MODULE_INTERNALS or k == "training":
            continue
        if (k in dense_keys) if dense_keys is not None else (not k.startswith("_")
                                                             or k == "_reversed_padding_repeated_twice"):
            new.__dict__[k] = v
    new.training = layer.training
    bias = getattr(layer, "bias", None)
    if share:
        new.weight, new.bias = layer.weight, bias
    else:
        # in the layer's memory format (a deployed weight computed from masks comes out contiguous)
        new.weight = nn.Parameter(weight.detach().clone(memory_format=memory_format_of(layer.weight)),
                                  requires_grad=layer.weight.requires_grad)
        new.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    for name in layer.__dict__.get("_dense_children", ()):  # an own forward's children (a padding module)
        new.add_module(name, copy.deepcopy(layer._modules[name]))
    params, buffers = layer.__dict__.get("_dense_tensors", ((), ()))
    for name in params:  # a subclass's own parameters and buffers (not the sparse layer's mask & co.)
        p = layer._parameters.get(name)
        new.register_parameter(name, None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    for name in buffers:
        b = layer._buffers.get(name)
        new.register_buffer(name, None if b is None else b.clone(),
                            persistent=name not in layer._non_persistent_buffers_set)
    share_hooks(layer.__dict__, new)
    return new
