"""transformers' ``Conv1D`` (GPT-2's attention and MLP projections): a Linear with its weight stored
transposed, ``y = x @ W + b`` with ``W`` of shape ``(in, out)``.

It is recognised by duck typing, so sparsify never imports transformers: a module whose class (or
a base class) is called ``Conv1D`` and that has an integer ``nf`` (output features), a 2-D
``weight`` of shape ``(in, nf)`` and a ``bias``. :class:`Conv1DLike` makes ``isinstance`` checks
against :data:`~sparsify.core.layers.WEIGHT_TYPES` see such modules; the helpers here let code
that counts or reshapes weights treat them as Linears: :func:`torch_layout` gives a weight-shaped
tensor in torch's ``(out, in, ...)`` layout (a transposed view for Conv1D, the tensor itself for
torch layers), :func:`out_features_of` / :func:`in_features_of` the feature counts.

The ConvTranspose helpers live here too (their weight is also stored transposed, ``(in, out/groups,
*kernel)``): :data:`CONV_TRANSPOSE_TYPES`, :func:`conv_transpose_forward`, :func:`grouped_transpose`.

Weight methods specialise the class lazily (``ST3Conv1D``, ...; see
:func:`~sparsify.core.layers.specialize`): its parameter stays ``weight`` of shape ``(in, out)``,
so state dicts and checkpoints keep their keys and shapes.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv1DLike", "is_conv1d", "is_conv1d_class", "linear_like", "torch_layout",
           "out_features_of", "in_features_of", "conv1d_forward", "CONV_TRANSPOSE_TYPES", "conv_transpose_forward",
           "grouped_transpose"]

CONV_TRANSPOSE_TYPES: tuple[type, ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_conv1d_class(cls: type) -> bool:
    """Whether ``cls`` is a module class called ``Conv1D`` (transformers' transposed Linear).

    >>> is_conv1d_class(nn.Conv1d), is_conv1d_class(type("Conv1D", (nn.Module,), {}))
    (False, True)
    """
    return cls.__name__ == "Conv1D" and issubclass(cls, nn.Module)


def is_conv1d(module) -> bool:
    """Whether ``module`` is a transformers-style ``Conv1D``: a ``Conv1D`` class in its MRO, an
    integer ``nf``, a 2-D weight of shape ``(in, nf)`` and a ``bias`` attribute.

    >>> is_conv1d(nn.Linear(2, 3))
    False
    """
    if not isinstance(module, nn.Module) or not any(is_conv1d_class(c) for c in type(module).__mro__):
        return False
    # the parameter itself: while torch.fx traces, module.weight is a proxy
    nf, w = getattr(module, "nf", None), module._parameters.get("weight")
    return (isinstance(nf, int) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == nf
            and "bias" in module._parameters)


class _Conv1DLikeMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return is_conv1d(obj)

    def __subclasscheck__(cls, sub) -> bool:
        return isinstance(sub, type) and any(is_conv1d_class(c) for c in sub.__mro__)


class Conv1DLike(metaclass=_Conv1DLikeMeta):
    """Virtual base class: ``isinstance(m, Conv1DLike)`` is :func:`is_conv1d` (never instantiated).

    >>> class Conv1D(nn.Module):
    ...     def __init__(self, nf, nx):
    ...         super().__init__(); self.nf = nf
    ...         self.weight = nn.Parameter(torch.zeros(nx, nf)); self.bias = nn.Parameter(torch.zeros(nf))
    >>> isinstance(Conv1D(3, 2), Conv1DLike), isinstance(nn.Linear(2, 3), Conv1DLike)
    (True, False)
    """

    label = "Conv1D"  # how messages name it


def linear_like(module) -> bool:
    """``nn.Linear`` or a ``Conv1D``: the input's last dimension holds the input features.

    >>> linear_like(nn.Linear(2, 3)), linear_like(nn.Conv1d(2, 3, 1))
    (True, False)
    """
    return isinstance(module, nn.Linear) or is_conv1d(module)


def grouped_transpose(module) -> bool:
    """A ConvTranspose with ``groups > 1``: its output channels are not one weight dimension
    (weight ``(in, out/groups, *kernel)``), so per-output-channel state has no axis to run along.

    >>> grouped_transpose(nn.ConvTranspose2d(4, 4, 3, groups=2)), grouped_transpose(nn.ConvTranspose2d(4, 4, 3))
    (True, False)
    """
    return isinstance(module, CONV_TRANSPOSE_TYPES) and module.groups > 1


def torch_layout(module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``module.weight``) in torch's ``(out, in, *kernel)`` layout: a transposed
    view for a ``Conv1D`` and a ConvTranspose (weight ``(in, out, *kernel)``; ``in`` is the
    dimension its kernel sums over), ``t`` itself otherwise. Applying it twice gives ``t`` back.
    A grouped ConvTranspose has no such view (see :func:`grouped_transpose`): ValueError.

    >>> torch_layout(nn.Linear(2, 3), torch.zeros(3, 2)).shape
    torch.Size([3, 2])
    >>> torch_layout(nn.ConvTranspose2d(2, 5, 3), torch.zeros(2, 5, 3, 3)).shape
    torch.Size([5, 2, 3, 3])
    """
    if is_conv1d(module):
        return t.t()
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        if module.groups > 1:
            raise ValueError(f"a ConvTranspose with groups={module.groups} has no (out, in, ...) view of its weight")
        return t.transpose(0, 1)
    return t


def out_features_of(module) -> int:
    """Output features / channels of a Conv, Linear or Conv1D.

    >>> out_features_of(nn.Conv2d(2, 5, 3)), out_features_of(nn.Linear(2, 4))
    (5, 4)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.nf
    return module.out_channels


def in_features_of(module) -> int:
    """Input features / channels of a Conv, Linear or Conv1D.

    >>> in_features_of(nn.Conv2d(2, 5, 3)), in_features_of(nn.Linear(2, 4))
    (2, 2)
    """
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.weight.shape[0]
    return module.in_channels


def conv_transpose_forward(module, x: torch.Tensor, weight: torch.Tensor, output_size=None) -> torch.Tensor:
    """What ``nn.ConvTranspose{1,2,3}d.forward(x, output_size)`` computes, with ``weight`` given.

    >>> up = nn.ConvTranspose2d(2, 3, 3, stride=2)
    >>> x = torch.randn(1, 2, 4, 4)
    >>> bool(torch.equal(conv_transpose_forward(up, x, up.weight, [10, 10]), up(x, output_size=[10, 10])))
    True
    """
    if module.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(module).__name__}")
    nd = weight.dim() - 2
    output_padding = module._output_padding(x, output_size, module.stride, module.padding, module.kernel_size, nd,
                                            module.dilation)
    fn = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
          torch.nn.functional.conv_transpose3d)[nd - 1]
    return fn(x, weight, module.bias, module.stride, module.padding, output_padding, module.groups, module.dilation)


def conv1d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, nf: int) -> torch.Tensor:
    """What transformers' ``Conv1D.forward`` computes, with ``weight`` (``(in, nf)``) given: the
    same ``addmm``, so a sparse layer and the finalized ``Conv1D`` agree bit for bit.

    >>> conv1d_forward(torch.ones(2, 3, 4), torch.ones(4, 5), torch.zeros(5), 5).shape
    torch.Size([2, 3, 5])
    """
    size_out = x.size()[:-1] + (nf,)
    x2 = x.reshape(-1, x.size(-1))
    y = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
    return y.view(size_out)
