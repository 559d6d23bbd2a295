"""The STR layers (``STRConv1d/2d/3d``, ``STRLinear``, ...): a Conv/Linear computing with the STR
weight from its own threshold parameter ``s``, or from the group's shared one (global
granularity)."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.core.layers import SparseWeightMixin, specialize
from sparsify.core.buffers import layer_buffers
from sparsify.methods.str.kernel import _SoftThreshold, _fast, _shrink, soft_threshold, str_threshold, str_weight

__all__ = ["STRMixin", "STR_CLASSES"]


class STRMixin(SparseWeightMixin):
    """Conv/Linear computing with the STR weight; its ``s`` is its own parameter, or the group's
    shared one (global granularity: then ``_shared_s`` references it without registering)."""

    def init_sparse(self, granularity: str = "layer", s_init: float = -10.0, **_) -> None:
        w = self.weight
        if granularity == "global":
            # the group registers the shared parameter once and sets it here (not registered);
            # until then (shape propagation at build time) the layer computes with s_init
            object.__setattr__(self, "_shared_s", torch.tensor(float(s_init), device=w.device))
            return
        # per channel: one threshold per output feature, (Cout, 1, ...) or a Conv1D's (1, out)
        shape = (1,) if granularity == "layer" else self.out_shape(w.shape[self.out_axis])
        self.s = nn.Parameter(torch.full(shape, float(s_init), dtype=torch.float32, device=w.device))

    def threshold_param(self) -> nn.Parameter:
        s = self._parameters.get("s")
        if s is not None:
            return s
        # global: read from the group each time, as FSDP2 swaps its sharded and gathered parameters
        owner = self.__dict__.get("_s_owner")
        return owner._parameters["s"] if owner is not None else self.__dict__["_shared_s"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _reshape_scalar_s(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def threshold(self) -> torch.Tensor:
        """``sigmoid(s)`` in float32 (scalar or ``(Cout, 1, ...)``)."""
        return str_threshold(self.threshold_param())

    def effective_weight(self) -> torch.Tensor:
        w, t = self.weight, self.threshold()
        return soft_threshold(w, t) if _fast(w, t) else str_weight(w, t)

    def _forward_weight(self) -> torch.Tensor:
        """:meth:`effective_weight` for this layer's own conv/linear: written into a reused
        buffer (recomputed only when ``W`` or ``s`` changed) and backpropagated in place."""
        w, s = self.weight, self.threshold_param()
        t = str_threshold(s)
        if not _fast(w, t):
            return str_weight(w, t)
        bufs = layer_buffers(self)
        eff = bufs.cached("eff", w, s)
        if eff is None:
            buf = bufs.target("eff", w)  # None while a pending graph still needs the buffer
            with torch.no_grad():
                eff = _shrink(w, t) if buf is None else bufs.store("eff", _shrink(w, t, out=buf), w, s)
        if not (torch.is_grad_enabled() and (w.requires_grad or t.requires_grad)):
            return eff
        pinned = bufs.pin("eff", eff) if bufs.holds(eff) else None
        return _SoftThreshold.apply(w, t, eff, True, pinned)

    def sparse_repr(self) -> str:
        t = self.threshold().detach()
        return f"threshold={float(t.mean()):.4g}" + ("" if t.numel() == 1 else " (mean)")


STR_CLASSES = specialize(STRMixin, prefix="STR")


def _reshape_scalar_s(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """A 0-d ``s`` (checkpoints from before single thresholds were 1-element) loads as ``(1,)``."""
    v, own = state_dict.get(prefix + "s"), module._parameters.get("s")
    if isinstance(v, torch.Tensor) and own is not None and v.dim() == 0 and own.shape == (1,):
        state_dict[prefix + "s"] = v.reshape(1)
