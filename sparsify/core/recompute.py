"""Effective weights recomputed in backward instead of saved from forward.

A sparse layer's conv / linear computes with its effective weight ``W_eff`` (``W ⊙ M``, ST-3's
shifted and scaled weight, STR's soft threshold), and autograd keeps that operand from the
forward to the backward. Under FSDP2 this undoes sharding: FSDP2 frees each unit's gathered
weights after its forward and gathers them again before its backward, but the effective weights
stayed, a whole unsharded copy of the model's sparse weights per rank at the end of every
forward (docs/distributed.md, "Memory under FSDP2").

:func:`recomputed` runs the layer's op under a ``saved_tensors_hooks`` pair that replaces every
saved tensor sharing ``W_eff``'s storage (``W_eff`` itself, the transposed view ``F.linear``
saves) by a note of its view, and rebuilds it in backward from the weights gathered again, with
the same function and so the same values: one elementwise pass per layer per backward. Every
other saved tensor goes through the hooks that were active outside (activation checkpointing,
``save_on_cpu``), untouched.

>>> w = torch.randn(3, 4, requires_grad=True); mask = torch.rand(3, 4) > 0.5
>>> x = torch.randn(2, 4, requires_grad=True)
>>> with recomputed(lambda: w * mask) as r:
...     y = torch.nn.functional.linear(x, r.weight())
>>> y.sum().backward(); bool(torch.equal(x.grad, (w * mask).sum(0).expand(2, 4)))
True
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["recomputed", "Recompute", "ENABLED"]

#: switch for benchmarks/fsdp_memory.py's time ratio (off: the effective weights are saved as before)
ENABLED = True


class _View:
    """A saved tensor that was a view of the effective weight's storage: rebuilt in backward."""

    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: "Recompute", t: torch.Tensor):
        self.source, self.size, self.stride = source, t.size(), t.stride()
        self.offset = t.storage_offset() - source.offset
        source.views += 1

    def unpack(self) -> torch.Tensor:
        eff = self.source.again()
        return eff.as_strided(self.size, self.stride, eff.storage_offset() + self.offset)


class _Outer:
    """What the hooks active outside packed (they unpack it)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _Held:
    """A tensor saved while the effective weight was being computed: kept, unless it turns out
    to share that weight's storage (STR's and N:M's autograd keep the weight they return)."""

    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t


class Recompute:
    """The hooks of :func:`recomputed`; ``weight()`` computes the effective weight under them."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.held = fn, []
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.views = 0  # saved tensors that were the weight or its views
        self.storage = None  # (data pointer, device) of the weight's storage, once computed
        self._again, self._left = None, 0

    def weight(self) -> torch.Tensor:
        eff = self.fn()
        # what the backward needs of the weight, not the weight: the graph holds this object
        self.like, self.offset = (eff.size(), eff.stride()), eff.storage_offset()
        self.storage = (eff.untyped_storage().data_ptr(), eff.device) if eff.numel() else (None, None)
        for h in self.held:  # packed now, in the order saved (activation checkpointing counts on it)
            h.t = _View(self, h.t) if self._aliases(h.t) else self._outer_pack(h.t)
        self.held = []
        return eff

    def again(self) -> torch.Tensor:
        """The weight computed again, once for all the views one backward unpacks (the conv's and
        the method's own autograd node each saved it): kept until the last of them is unpacked."""
        if self._again is None:
            with torch.no_grad():
                eff = self.fn()
            if (eff.size(), eff.stride()) != self.like:  # laid out as the forward's was, to take its views
                eff = torch.empty_strided(*self.like, dtype=eff.dtype, device=eff.device).copy_(eff)
            self._again, self._left = eff, self.views
        eff = self._again
        self._left -= 1
        if self._left <= 0:
            self._again = None  # a second backward (retain_graph) computes it again
        return eff

    def _aliases(self, t: torch.Tensor) -> bool:
        ptr, device = self.storage
        return ptr is not None and t.device == device and t.untyped_storage().data_ptr() == ptr

    def pack(self, t: torch.Tensor):
        if self.storage is None:  # inside fn: which storage is the weight's is known when it returns
            self.held.append(held := _Held(t))
            return held
        return _View(self, t) if self._aliases(t) else self._outer_pack(t)

    def _outer_pack(self, t: torch.Tensor):
        return _Outer(self.outer[0](t)) if self.outer is not None else t

    def unpack(self, p):
        if isinstance(p, _Held):
            p = p.t
        if isinstance(p, _View):
            return p.unpack()
        return self.outer[1](p.value) if isinstance(p, _Outer) else p


@contextlib.contextmanager
def recomputed(fn: Callable[[], torch.Tensor]):
    """Inside, autograd saves no tensor that shares the storage of the weight ``fn()`` gives: the
    backward calls ``fn()`` again (without gradients) for it. Yields the object whose
    ``weight()`` computes that weight (call it inside). ``fn`` must give the same values at
    backward time, from weights and state that do not change in between. Where saved-tensor
    hooks are disabled, ``weight()`` is ``fn()`` and nothing else changes."""
    r = Recompute(fn)
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        r.weight = fn
        yield r
        return
    with torch.autograd.graph.saved_tensors_hooks(r.pack, r.unpack):
        yield r
