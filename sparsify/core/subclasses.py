"""Conv/Linear subclasses that compute with their own forward (timm's ``StdConv2d``, ``Conv2dSame``).

A sparse layer computes ``F.conv2d`` / ``F.linear`` with its effective weight. A subclass with its
own ``forward`` may do more: pad the input at run time (timm's ``Conv2dSame``, TF "same"
padding) or transform the weight first (timm's ``StdConv2d`` / ``ScaledStdConv2d`` standardise it,
Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization"). Replacing such a layer by a plain sparse one would silently change the model.

Two cases:

* classes whose forward hands ``self.weight`` unchanged to the conv/linear (:data:`KEEPS_WEIGHT`):
  a weight method's sparse layer runs that forward with its effective weight in place of
  ``self.weight`` (:func:`own_forward_with`) and finalizes to the same class, so the sparse
  weights are the kernel the layer uses;
* any other own forward (weight standardisation: masking the raw weight would give no zeros in the
  standardised kernel): the layer stays dense, with :func:`refusal` as the plan's reason.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

__all__ = ["KEEPS_WEIGHT", "OWN_FORWARD", "put_back", "own_forward_class", "own_forward_reason", "keeps_weight",
           "refusal", "own_forward_with"]

# qualified names of classes whose forward is the torch layer's computation on ``self.weight`` as
# it is (after padding the input, or a dtype cast under TorchScript): a sparse weight stays sparse
KEEPS_WEIGHT = {
    "timm.layers.conv2d_same.Conv2dSame",  # pad_same(x) then F.conv2d(x, self.weight, ...)
    "timm.layers.linear.Linear",  # F.linear(x, self.weight, self.bias)
    "transformers.models.falcon.modeling_falcon.FalconLinear",  # x @ self.weight.T (+ self.bias)
    # lukemelas' efficientnet_pytorch: TF "same" padding (a ZeroPad2d child, or computed per call),
    # then F.conv2d(x, self.weight, ...)
    "efficientnet_pytorch.utils.Conv2dStaticSamePadding",
    "efficientnet_pytorch.utils.Conv2dDynamicSamePadding",
}

OWN_FORWARD = "computes with its own forward"  # the plan's reason starts so (sparsify() warns once)
COMPUTED_WEIGHT = "weight is computed by"  # a parametrized layer's reason holds this (sparsify() warns once)
# a transformers class that builds the norm (wav2vec2, HuBERT) loads checkpoints by its keys only
PUT_BACK = ("; where the model's class builds the layer so (transformers' wav2vec2), put the norm back on the "
            "finalized model before save_pretrained, {} (docs/transformers.md#weight-normed-layers-wav2vec2), "
            "or from_pretrained finds no weight for it")


def put_back(module: nn.Module, layer: str = "layer") -> str | None:
    """The call that gives ``layer`` the weight norm computing ``module.weight`` (a
    parametrization or the deprecated pre-hook), or None when there is none.

    >>> put_back(nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 2, 3), dim=2))
    "torch.nn.utils.parametrizations.weight_norm(layer, 'weight', dim=2)"
    """
    via = getattr(getattr(module, "parametrizations", None), "weight", None)
    for p in via or ():
        if type(p).__name__ == "_WeightNorm":
            return f"torch.nn.utils.parametrizations.weight_norm({layer}, 'weight', dim={p.dim})"
    for h in module._forward_pre_hooks.values():
        if type(h).__name__ == "WeightNorm" and getattr(h, "name", None) == "weight":
            return f"torch.nn.utils.weight_norm({layer}, 'weight', dim={h.dim})"
    return None


def computed_weight_reason(module: nn.Module) -> str | None:
    """Why a layer whose ``weight`` is no parameter of its own (``weight_norm`` and other
    parametrizations: wav2vec2's positional conv; ``torch.nn.utils.prune``) stays dense, with the
    call that makes it a parameter again, or None.

    >>> conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 2, 3))
    >>> computed_weight_reason(conv).split(",")[0]
    'the weight is computed by a parametrization (_WeightNorm)'
    >>> pruned = prune.l1_unstructured(nn.Conv1d(2, 2, 3), "weight", 0.5)
    >>> computed_weight_reason(pruned).split(", which")[0]
    'the weight is computed by torch.nn.utils.prune (weight_orig x weight_mask, L1Unstructured)'
    >>> computed_weight_reason(nn.utils.spectral_norm(nn.Linear(2, 2))).split(";")[1]
    ' torch.nn.utils.remove_spectral_norm(layer) before sparsify() makes it a parameter again and takes it in'
    >>> computed_weight_reason(nn.Conv1d(2, 2, 3)) is None
    True
    """
    if "weight" in module._parameters:
        return None
    via = getattr(getattr(module, "parametrizations", None), "weight", None)
    pruning = [h for h in module._forward_pre_hooks.values()
               if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == "weight"]
    if via is not None:
        how = f"a parametrization ({', '.join(type(p).__name__ for p in via)})"
        fix = ("sparsifier.squash_mask() (torch.ao.pruning) before sparsify() takes it in, its zeros kept"
               if any(type(p).__name__ == "FakeSparsity" for p in via) else
               "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') before sparsify() takes it in")
    elif pruning:
        # a PruningContainer holds the methods applied one after the other
        names = [type(m).__name__ for h in pruning for m in getattr(h, "_pruning_methods", (h,))]
        how = f"torch.nn.utils.prune (weight_orig x weight_mask, {', '.join(names)})"
        fix = ("torch.nn.utils.prune.remove(layer, 'weight') before sparsify() makes the pruned weight a parameter "
               "again (its zeros stay) and takes it in")
    else:
        # the deprecated torch.nn.utils.weight_norm / spectral_norm: a pre-hook recomputing `weight`
        hooks = [type(h).__name__ for h in module._forward_pre_hooks.values() if getattr(h, "name", None) == "weight"]
        how = f"a forward pre-hook ({', '.join(hooks)})" if hooks else "something other than a parameter"
        removers = {"WeightNorm": "torch.nn.utils.remove_weight_norm(layer)",
                    "SpectralNorm": "torch.nn.utils.remove_spectral_norm(layer)"}
        fix = (f"{' and '.join(removers[h] for h in hooks if h in removers) or 'removing the hook'} before sparsify() "
               "makes it a parameter again and takes it in" if hooks else
               "make it a parameter of the layer before sparsify() to take it in")
    if (call := put_back(module)) is not None:
        fix += PUT_BACK.format(call)
    # neither a mask on the stored tensors nor a sparse copy of the weight would hold
    return f"the {COMPUTED_WEIGHT} {how}, which a sparse layer would not keep: left dense; {fix}"


def own_forward_class(module: nn.Module, base: type) -> type | None:
    """The class before the torch weight class ``base`` in ``type(module)``'s method order that
    defines ``forward`` (or ``_conv_forward``), or None when the layer computes as ``base`` does.

    Every class before ``base`` counts, also one that is no subclass of it: a mixin
    (``class C(Doubled, nn.Conv2d)``) or an intermediate base (torch.ao's QAT ``ConvBn2d``, whose
    ``_ConvBnNd`` folds the BatchNorm and fake-quantises the weight) overrides ``base``'s forward.

    >>> class Padded(nn.Conv2d):
    ...     def forward(self, x):
    ...         return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))
    >>> own_forward_class(Padded(1, 1, 3), nn.Conv2d).__name__
    'Padded'
    >>> class Doubled:
    ...     def forward(self, x):
    ...         return super().forward(x) * 2
    >>> class DoubledConv(Doubled, nn.Conv2d):
    ...     pass
    >>> own_forward_class(DoubledConv(1, 1, 3), nn.Conv2d).__name__
    'Doubled'
    >>> own_forward_class(nn.Conv2d(1, 1, 3), nn.Conv2d) is None
    True
    """
    for cls in type(module).__mro__:
        if cls is base:
            return None
        if "forward" in vars(cls) or "_conv_forward" in vars(cls):
            return cls
    return None


def own_forward_reason(module: nn.Module, base: type) -> str | None:
    """Why a path that computes as ``base`` does (the CPU acceleration kernels) cannot take
    ``module``, or None.

    >>> class Padded(nn.Conv2d):
    ...     def forward(self, x):
    ...         return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))
    >>> own_forward_reason(Padded(1, 1, 3), nn.Conv2d)
    'Padded computes with its own forward'
    """
    return None if own_forward_class(module, base) is None else f"{type(module).__name__} {OWN_FORWARD}"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def keeps_weight(cls: type) -> bool:
    """Whether ``cls``'s own forward uses ``self.weight`` unchanged (:data:`KEEPS_WEIGHT`)."""
    return _qualified(cls) in KEEPS_WEIGHT


def refusal(module: nn.Module, base: type, runs_own_forward: bool) -> str | None:
    """Why a layer of a subclass with its own forward stays dense, or None when it may be rewritten.

    ``runs_own_forward``: the method's sparse layer runs a :data:`KEEPS_WEIGHT` class's forward
    with its effective weight (the weight methods); other methods (SAS, which widens the layer)
    leave every such layer dense.

    >>> class Std(nn.Conv2d):
    ...     def forward(self, x):
    ...         w = (self.weight - self.weight.mean()) / self.weight.std()
    ...         return self._conv_forward(x, w, self.bias)
    >>> refusal(Std(1, 1, 3), nn.Conv2d, True).split(":")[0]
    'Std computes with its own forward (sparsify.core.subclasses.Std), which a sparse layer would not keep'
    >>> KEEPS_WEIGHT.add(_qualified(Std)); refusal(Std(1, 1, 3), nn.Conv2d, False).split(": ")[1]
    'left dense (the weight methods rewrite it, running that forward with the sparse weight)'
    >>> KEEPS_WEIGHT.discard(_qualified(Std))
    """
    cls = own_forward_class(module, base)
    if cls is None or (runs_own_forward and keeps_weight(cls)):
        return None
    if keeps_weight(cls):  # a weight method runs it; this method (SAS) computes its own way
        return (f"{type(module).__name__} {OWN_FORWARD} ({_qualified(cls)}), which this method's layer would not "
                "run: left dense (the weight methods rewrite it, running that forward with the sparse weight)")
    return (f"{type(module).__name__} {OWN_FORWARD} ({_qualified(cls)}), which a sparse layer would not keep: "
            "left dense (it may transform the weight, as weight standardisation does, so masking the stored "
            "weight would not make its kernel sparse)")


class _WithWeight:
    """``layer`` with ``weight`` read in place of ``layer.weight`` (every other attribute is the layer's)."""

    __slots__ = ("_layer", "weight")

    def __init__(self, layer: nn.Module, weight):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "weight", weight)

    def __getattr__(self, name):
        return getattr(self._layer, name)


def own_forward_with(layer: nn.Module, cls: type, x, weight):
    """``cls.forward`` of ``layer`` computed with ``weight`` in place of ``layer.weight``.

    >>> import torch
    >>> class Padded(nn.Conv2d):
    ...     def forward(self, x):
    ...         return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)
    >>> conv = Padded(1, 1, 3)
    >>> own_forward_with(conv, Padded, torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 3, 3)).shape
    torch.Size([1, 1, 2, 2])
    """
    return cls.forward(_WithWeight(layer, weight), x)
