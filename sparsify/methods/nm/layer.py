"""The N:M layers (``NMConv1d/2d/3d``, ``NMLinear``, ...): a Conv/Linear computing with ``W ⊙ M``,
its mask set by the group and kept incrementally."""
from __future__ import annotations

import torch

from sparsify.core.layers import SparseWeightMixin, specialize
from sparsify.core.conv1d import torch_layout
from sparsify.core.buffers import content_key, eager, layer_buffers
from sparsify.methods.nm.mask import _changed, _keep_planes, _to_weight_layout, nm_mask
from sparsify.methods.nm.kernel import _MaskedStraightThrough, _NMWeight

__all__ = ["NMMixin", "NM_CLASSES"]


class NMMixin(SparseWeightMixin):
    """Conv/Linear computing with ``W ⊙ M`` (N:M mask set by the group).

    The forward multiplies by a float copy of the mask (bool/float products are several times
    slower), refreshed when the mask changes, into a reused buffer recomputed only when ``W``
    or the mask changed (see :mod:`sparsify.core.buffers`)."""

    def init_sparse(self, n: int = 2, m: int = 4, decay: float = 0.0, **_) -> None:
        self.nm = (int(n), int(m))
        self.sr_ste_decay = float(decay)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=self.weight.device))

    def _is_fixed(self) -> bool:
        # bool(tensor) would synchronise a GPU in every forward: remember it per version
        key = content_key(self.fixed)
        seen = self.__dict__.get("_fixed_seen")
        if key is None or seen is None or seen[0] != key:
            seen = self.__dict__["_fixed_seen"] = (key, bool(self.fixed))
        return seen[1]

    def mask_float(self) -> torch.Tensor:
        """The mask as 0/1 in the weight's dtype (refreshed when the bool mask changed)."""
        w, mask = self.weight, self.mask
        bufs = layer_buffers(self)
        mask_f = bufs.cached("mask_f", mask)
        if mask_f is None:
            buf = bufs.target("mask_f", w)
            with torch.no_grad():
                # through uint8: bool -> float copies are ~2x slower than uint8 -> float
                src = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
                mask_f = src.to(w.dtype) if buf is None else bufs.store("mask_f", buf.copy_(src), mask)
        return mask_f

    def _fast(self) -> bool:
        w = self.weight
        return w.is_floating_point() and w.layout == torch.strided and self.mask.shape == w.shape and eager()

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        if not self._fast():
            if eager():  # an integer or sparse weight: reading the flag costs nothing that matters here
                return w * self.mask if bool(self.fixed) else _MaskedStraightThrough.apply(w, self.mask, self.sr_ste_decay)
            # torch.compile / export: one graph for both phases, no graph break on the flag
            return _MaskedStraightThrough.apply(w, self.mask, self.sr_ste_decay, self.fixed)
        mask_f = self.mask_float()
        with torch.no_grad():
            eff = w * mask_f
        if not (torch.is_grad_enabled() and w.requires_grad):
            return eff
        return _NMWeight.apply(w, eff, self._saved_mask(mask_f), not self._is_fixed(), self.sr_ste_decay, False, None)

    def _forward_weight(self) -> torch.Tensor:
        """:meth:`effective_weight` for this layer's own conv/linear: a reused buffer,
        backpropagated in place."""
        if not self._fast():
            return self.effective_weight()
        w = self.weight
        mask_f = self.mask_float()
        bufs = layer_buffers(self)
        eff = bufs.cached("eff", w, mask_f)
        if eff is None:
            buf = bufs.target("eff", w)  # None while a pending graph still needs the buffer
            with torch.no_grad():
                eff = w * mask_f if buf is None else bufs.store("eff", torch.mul(w, mask_f, out=buf), w, mask_f)
        if not (torch.is_grad_enabled() and w.requires_grad):
            return eff
        pinned = bufs.pin("eff", eff) if bufs.holds(eff) else None
        return _NMWeight.apply(w, eff, self._saved_mask(mask_f), not self._is_fixed(), self.sr_ste_decay, True, pinned)

    def _saved_mask(self, mask_f: torch.Tensor) -> torch.Tensor:
        """What the backward keeps of the mask: a layer that keeps nothing between calls (FSDP2)
        keeps the bool buffer, not a float copy alive from the forward to the backward."""
        bufs = layer_buffers(self, create=False)
        return self.mask if bufs is not None and bufs.transient and self.mask.shape == mask_f.shape else mask_f

    @torch.no_grad()
    def recompute_mask(self, n: int, m: int) -> None:
        """Set ``mask`` to :func:`nm_mask` of the current weight.

        Between steps only a few thousand of millions of flags flip, so the layer keeps its
        mask in planes layout as well and writes only the flags that changed; a full rewrite
        happens the first time and whenever something else wrote the mask (``load_state_dict``,
        a user)."""
        w, mask = self.weight, self.mask
        # groups run along the input dimension: computed in torch's (out, in, ...) layout
        wt = torch_layout(self, w)
        flat, rows, k = _keep_planes(wt, n, m)
        state = layer_buffers(self).state
        prev = state.get("keep")
        key = content_key(mask)
        if (prev is None or key is None or state.get("mask_key") != key or prev.shape != flat.shape
                or prev.device != flat.device or not mask.is_contiguous() or mask.dtype != torch.bool):
            if not mask.is_contiguous() or mask.dtype != torch.bool:
                nm_mask(wt, n, m, out=torch_layout(self, mask))
            elif self.out_axis:  # a Conv1D's / ConvTranspose's mask is the transpose of the torch layout
                full = torch.empty(wt.shape, dtype=torch.bool, device=w.device)
                _to_weight_layout(flat, full, m, rows, k)
                mask.copy_(torch_layout(self, full))
            else:
                _to_weight_layout(flat, mask, m, rows, k)
            if prev is None or prev.shape != flat.shape or prev.device != flat.device:
                prev = state["keep"] = torch.empty_like(flat)
            prev.copy_(flat)
        else:
            at = _changed(flat, prev)
            if at.numel():
                vals = flat[at]
                prev[at] = vals
                size = rows * k
                member, rest = at // size, at % size
                at_w = (rest // k) * (m * k) + member * k + rest % k  # planes -> weight layout
                if self.out_axis:  # (out, in, k) index -> the Conv1D's / ConvTranspose's (in, out, k) one
                    cout, cin = wt.shape[0], wt.shape[1]
                    o, i = at_w // (cin * k), (at_w // k) % cin
                    at_w = (i * cout + o) * k + at_w % k
                # (the float copy of the mask is not patched too: sparsify.step dropped every
                # layer's cached values before this update, and the next forward makes it anew)
                mask.view(-1)[at_w] = vals.view(torch.bool)
        state["mask_key"] = content_key(mask)

    def sparse_repr(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}, fixed={bool(self.fixed)}"


NM_CLASSES = specialize(NMMixin, prefix="NM")
