"""Layer building blocks every weight method shares.

* :class:`SparseWeightMixin`: a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (or transformers'
  ``Conv1D``) whose forward uses an effective weight; :func:`specialize` makes one class per
  weight class, so a sparse layer keeps its class's behaviour, its qualified name and its
  parameter names (``layer1.0.conv1.weight`` stays ``layer1.0.conv1.weight``);
* :func:`~sparsify.core.masked_weight.masked_weight`: ``W ⊙ M`` with its gradient, reused while
  neither changes.

The plain torch layer a sparse layer finalizes to: :func:`sparsify.core.plain.plain_copy`.

The method contract (``Method``, ``Group``, ``Site``) is in :mod:`sparsify.core.contract`.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from passes.rewrite import recast

from sparsify.core.buffers import eager, layer_buffers
from sparsify.core.conv1d import (CONV_TRANSPOSE_TYPES, Conv1DLike, conv1d_forward, conv_transpose_forward,
                                  is_conv1d_class)
from sparsify.core import recompute
from sparsify.core.forwards import entered
# defined here before masked_weight.py: methods/st3.py still imports it from here
from sparsify.core.masked_weight import masked_weight  # noqa: F401
from sparsify.core.records import RecordsMixin  # noqa: F401  (its home before records.py)
from sparsify.core.sharded import check_gathered, note_fsdp
from sparsify.core.subclasses import own_forward_class, own_forward_with

__all__ = ["SparseWeightMixin", "RecordsMixin", "specialize", "WEIGHT_TYPES", "TORCH_WEIGHT_TYPES", "weight_base",
           "masked_weight", "drop_all_caches", "CONV_TRANSPOSE_TYPES"]

# ConvTranspose1d/2d/3d: weight (in, out/groups, *kernel), output channels along dimension 1
TORCH_WEIGHT_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + CONV_TRANSPOSE_TYPES
# transformers' Conv1D (GPT-2) too, recognised by duck typing (see conv1d.py)
WEIGHT_TYPES: tuple[type, ...] = TORCH_WEIGHT_TYPES + (Conv1DLike,)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

def weight_base(module: nn.Module) -> type:
    """The weight class (torch's Conv1d/2d/3d or Linear, or a ``Conv1D`` class) ``module`` is an
    instance of.

    >>> weight_base(nn.Conv2d(1, 1, 1)).__name__
    'Conv2d'
    """
    return next(c for c in type(module).__mro__ if c in TORCH_WEIGHT_TYPES or is_conv1d_class(c))


class SparseWeightMixin:
    """Mixed in front of a Conv/Linear class: the forward uses :meth:`effective_weight`.

    Subclasses implement ``effective_weight()`` (what the forward multiplies with, autograd
    included) and may override ``init_sparse(**params)`` to add buffers/parameters.

    ``out_axis`` is the weight dimension of the output features: 0 for torch's Conv/Linear, 1 for
    a ``Conv1D`` (weight ``(in, out)``) and a ConvTranspose (weight ``(in, out/groups, *kernel)``;
    methods with per-output-channel state leave grouped ones dense, see
    :meth:`~sparsify.core.contract.Method.accepts`). Per-output-channel state is shaped with
    :meth:`out_shape`.
    """

    out_axis: int = 0
    calls_entered = True  # its forward calls sparsify.core.forwards.entered (no pre-hook needed)
    #: the weight shape its masks and thresholds were made for (:meth:`from_dense`); see :meth:`resized`
    _sparse_shape: torch.Size | None = None

    def resized(self) -> bool:
        """Whether the layer was given a weight of another shape than its masks and thresholds were
        made for (transformers' ``resize_token_embeddings`` writes a resized tensor into a tied LM
        head's weight): it then computes dense until ``sparsify.step`` / ``report`` / ``finalize``
        make it the plain layer (:func:`sparsify.core.state.forget_replaced`), and a tied user reads
        its weight as it is."""
        return self._sparse_shape is not None and self._sparse_shape != self.weight.shape

    def out_shape(self, n: int = -1) -> tuple[int, ...]:
        """The shape that makes a per-output-channel vector of ``n`` entries broadcast against
        the weight: ``(n, 1, ...)``, or ``(1, n)`` for a ``Conv1D``.

        >>> from sparsify.methods.magnitude import MAGNITUDE_CLASSES
        >>> MAGNITUDE_CLASSES[nn.Conv2d].from_dense(nn.Conv2d(2, 4, 3)).out_shape()
        (-1, 1, 1, 1)
        """
        shape = [1] * self.weight.dim()
        shape[self.out_axis] = n
        return tuple(shape)

    def init_sparse(self, **params) -> None:
        pass

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def deployed_weight(self) -> torch.Tensor:
        """The weight a plain layer must hold to compute what this layer computes in eval mode."""
        w = self.effective_weight().detach()
        # a cached effective weight is overwritten by later steps: hand out a copy
        return w.clone() if self._aliases_scratch(w) else w

    def forward(self, x, output_size=None):
        entered(self, x)
        check_gathered(self, self.weight)
        note_fsdp(self)  # FSDP2: nothing weight-sized kept between forwards
        return self.forward_saving(x, self._forward_weight, output_size)

    def forward_saving(self, x, weight_fn, output_size=None):
        """:meth:`forward_with` the weight ``weight_fn()`` gives. A layer that keeps nothing
        between calls (FSDP2, :func:`~sparsify.core.sharded.note_fsdp`) does not keep that
        weight from its forward to its backward either: backward computes it again from the
        weights FSDP2 gathers for it (:mod:`sparsify.core.recompute`)."""
        if self.resized():  # its masks no longer fit the weight: dense
            return self.forward_with(x, self.weight, output_size)
        # eager() first: under torch.compile the buffers' weak map is not read (dynamo would guard
        # on its keys, which other models' garbage collection changes)
        bufs = (layer_buffers(self, create=False) if eager() and torch.is_grad_enabled() and recompute.ENABLED
                else None)
        if bufs is None or not bufs.transient:
            return self.forward_with(x, weight_fn(), output_size)
        with recompute.recomputed(weight_fn) as r:
            return self.forward_with(x, r.weight(), output_size)

    def _forward_weight(self) -> torch.Tensor:
        """What the layer's own forward computes with (a method may reuse a buffer here)."""
        return self.effective_weight()

    def forward_with(self, x, weight, output_size=None):
        """The dense layer's forward with ``weight`` (``output_size``: a ConvTranspose's argument)."""
        own = self.__dict__.get("_own_forward")
        if own is not None:  # timm's Conv2dSame: its padding stays (sparsify.core.subclasses)
            return own_forward_with(self, own, x, weight)
        if isinstance(self, CONV_TRANSPOSE_TYPES):
            return conv_transpose_forward(self, x, weight, output_size)
        if output_size is not None:
            raise TypeError(f"{type(self).__name__}.forward() takes no output_size (only ConvTranspose layers do)")
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, self.bias)
        if self.out_axis:  # transformers' Conv1D
            return conv1d_forward(x, weight, self.bias, self.nf)
        return self._conv_forward(x, weight, self.bias)

    @classmethod
    def from_dense(cls, dense: nn.Module, **params):
        """Wrap ``dense`` without copying its parameters: the new layer shares them."""
        # containers must not be shared with the dense layer, or adding a buffer would add it there
        new = recast(dense, cls, ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                                  "_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
        own = own_forward_class(dense, weight_base(dense))
        if own is not None:  # a class whose forward uses the weight as is (Method.accepts refused the others)
            new._own_forward = own
        # what finalize gives back: the layer's own class (MultiheadAttention's
        # NonDynamicallyQuantizableLinear, which quantize_dynamic must skip; a user's subclass) with
        # what it held besides weight and bias (efficientnet_pytorch's static_padding child)
        new._dense_class = type(dense)
        new._dense_keys = frozenset(dense.__dict__)
        new._dense_children = tuple(dense._modules)
        new._dense_tensors = (tuple(k for k in dense._parameters if k not in ("weight", "bias")), tuple(dense._buffers))
        new.init_sparse(**params)
        new._sparse_shape = new.weight.shape  # what its masks and thresholds were made for
        return new

    def dense_class(self) -> type:
        """The class this layer finalizes to: the class of the layer it was made from (layers made
        before that was recorded: the torch.nn class it specialises, or a ``Conv1D``)."""
        return self.__dict__.get("_dense_class") or weight_base(self)

    def extra_repr(self) -> str:
        # Conv1D has no extra_repr (it overrides __repr__)
        if self.out_axis and not isinstance(self, CONV_TRANSPOSE_TYPES):
            return f"nf={self.nf}, nx={self.weight.shape[0]}, {self.sparse_repr()}"
        return super().extra_repr() + f", {self.sparse_repr()}"

    def sparse_repr(self) -> str:
        return ""

    # -- an averaged copy taking the training model's state (sparsify.sync) -------------------
    def before_sync(self):
        """Called on an EMA / SWA copy's layer before ``sparsify.sync`` loads the training
        model's state into it; what it returns goes to :meth:`after_sync`. Default: nothing."""
        return None

    def after_sync(self, before, source=None) -> None:
        """Called after that load with :meth:`before_sync`'s value and the training model's layer
        of the same name: a method whose state change also rewrote the training model's weights
        (ST-3's fix bakes ``W ← W_eff``) applies it to the copy's averaged weights here, so that
        they keep meaning what the model's mean."""

    def averaged_lag(self) -> tuple[int, int] | None:
        """On an averaged copy just synced: ``(weights the training model keeps that the copy's
        averaged values turn into something else, weights it keeps)``, for a method whose
        effective weight depends on the weight's value against a threshold (ST-3's soft
        threshold flips the sign of a kept weight below τ); None when it cannot (default)."""
        return None

    # -- reused buffers and cached effective weights (speed only, never state) -------------
    # Held by sparsify.core.buffers (keyed weakly by the module), so state_dict, deepcopy,
    # pickling, DDP's buffer broadcast and ``.to()`` never see them.

    def scratch(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor of ``like``'s shape and device (and ``dtype``, default ``like``'s) that this
        layer keeps between calls, for writing with ``out=`` instead of allocating every step
        (:meth:`sparsify.core.buffers.LayerBuffers.buffer`).

        Its content is whatever was last written; ``drop_caches(free=True)`` and ``.to()`` free it.

        >>> from sparsify.methods.magnitude import MAGNITUDE_CLASSES
        >>> lin = MAGNITUDE_CLASSES[nn.Linear].from_dense(nn.Linear(3, 2))
        >>> buf = lin.scratch("tmp", lin.weight)
        >>> buf.shape, buf is lin.scratch("tmp", lin.weight)
        (torch.Size([2, 3]), True)
        """
        return layer_buffers(self).buffer(name, like, dtype)

    def cached(self, name: str, *sources: torch.Tensor) -> torch.Tensor | None:
        """The tensor last stored under ``name`` by :meth:`store_cached`, if neither it nor any
        of ``sources`` changed since (same tensor objects, storage and version counter), else None."""
        b = layer_buffers(self, create=False)
        return None if b is None else b.cached(name, *sources)

    def store_cached(self, name: str, value: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        """Remember ``value`` (usually a :meth:`scratch` tensor) as computed from ``sources``
        in their current state; a later :meth:`cached` call returns it while they are unchanged."""
        return layer_buffers(self).store(name, value, *sources)

    def drop_caches(self, free: bool = False) -> None:
        """Forget the cached values of this layer (``free``: drop its buffers too)."""
        b = layer_buffers(self, create=False)
        if b is not None:
            b.clear(free)

    def _aliases_scratch(self, t: torch.Tensor) -> bool:
        b = layer_buffers(self, create=False)
        return b is not None and b.holds(t)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() / to_empty(): buffers would stay on the old device
        self.drop_caches(free=True)
        return super()._apply(fn, recurse)


def drop_all_caches(root: nn.Module) -> None:
    """Forget what every sparse layer under ``root`` computed from its weights: after a write
    that no version counter sees (Lightning's weight swaps through ``.data``) or an in-place
    rewrite of the weights by an averaging tool."""
    for m in root.modules():
        if isinstance(m, SparseWeightMixin):
            m.drop_caches()


class _Specialized(dict):
    """``{weight class: sparse class}``; a ``Conv1D`` class gets its sparse class on first use
    (``<prefix>Conv1D``, with ``out_axis = 1``), so transformers is never imported here."""

    def __init__(self, mixin: type, namespace: dict, prefix: str):
        super().__init__()
        self.mixin, self.namespace, self.prefix = mixin, namespace, prefix

    def __missing__(self, base: type) -> type:
        if not is_conv1d_class(base):
            raise KeyError(base)
        name = f"{self.prefix}Conv1D"
        if base.__module__ != "transformers.pytorch_utils":
            # another class called Conv1D: its own name (picklable only where it was made)
            name = f"{name}_{sum(1 for b in self if is_conv1d_class(b)) + 1}"
        cls = type(name, (self.mixin, base), {"__module__": self.mixin.__module__, "__qualname__": name,
                                               "out_axis": 1, "__repr__": nn.Module.__repr__})
        self.namespace[name] = self[base] = cls
        return cls


# module name -> {"<prefix>Conv1D": classes}: what the module-level __getattr__ below resolves
_LAZY: dict[str, dict[str, _Specialized]] = {}


def _lazy_getattr(module_name: str):
    def __getattr__(name: str):
        classes = _LAZY.get(module_name, {}).get(name)
        if classes is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        # unpickling a sparse Conv1D (torch.save(model)) in a process that has not made its class yet
        from transformers.pytorch_utils import Conv1D
        return classes[Conv1D]
    return __getattr__


def specialize(mixin: type, namespace: dict | None = None, prefix: str | None = None) -> dict[type, type]:
    """Create ``{Conv1d: <prefix>Conv1d, ..., Linear: <prefix>Linear}`` classes from a mixin.

    The classes are stored in the mixin's module namespace under their names, so pickling and
    ``torch.save(model)`` find them. A ``Conv1D`` class (transformers') looked up in the result
    gets ``<prefix>Conv1D`` made then; the module resolves that name lazily too (for unpickling).

    >>> class _HalfMixin(SparseWeightMixin):
    ...     def effective_weight(self):
    ...         return self.weight * 0.5
    >>> classes = specialize(_HalfMixin, prefix="Half")
    >>> classes[nn.Linear].__name__
    'HalfLinear'
    """
    module = sys.modules[mixin.__module__]
    namespace = namespace if namespace is not None else vars(module)
    prefix = prefix or mixin.__name__.replace("Mixin", "")
    out = _Specialized(mixin, namespace, prefix)
    for base in TORCH_WEIGHT_TYPES:
        name = f"{prefix}{base.__name__}"
        attrs = {"__module__": mixin.__module__, "__qualname__": name}
        if base in CONV_TRANSPOSE_TYPES:
            attrs["out_axis"] = 1
        cls = type(name, (mixin, base), attrs)
        namespace[name] = cls
        out[base] = cls
    if namespace is vars(module):
        _LAZY.setdefault(module.__name__, {})[f"{prefix}Conv1D"] = out
        namespace.setdefault("__getattr__", _lazy_getattr(module.__name__))
    return out
