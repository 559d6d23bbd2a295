"""Weight-sized tensors that STR and N:M layers reuse from step to step instead of allocating.

On CPU a fresh weight-sized tensor costs several times the arithmetic that fills it (the pages
are new to the process every time: ``w * m`` is ~10x slower than ``torch.mul(w, m, out=buf)``
on ResNet-18's 11 M weights). A layer's forward therefore writes its effective weight into a
:class:`ReusedWeight` buffer, and the backward of its custom autograd function works in
place on the incoming gradient (the conv/linear it feeds created that gradient for it alone).

Rules that keep this exact and safe:

* the buffer is overwritten only when no autograd graph still needs its content: every
  forward that hands it out with history pins it (:meth:`ReusedWeight.pin`) until that graph's
  backward ran or the graph was freed; while pinned, a forward that needs new content gets a
  fresh tensor (the old, allocating behaviour);
* its content is reused without recomputing only while the tensors it was computed from are
  the same objects at the same version (:func:`content_key`), and the buffer itself was not
  written by anyone else;
* whatever a caller holds is an alias sharing the buffer's version counter, so a graph that
  saved it and is backpropagated after a rewrite fails loudly (PyTorch's "modified by an
  inplace operation") instead of computing with the new values;
* none of this runs while a tracer or transform records the forward (:func:`eager`); buffers
  never appear in ``state_dict``, copies or pickles.
"""
from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["ReusedWeight", "Transient", "content_key", "eager", "scratch"]


def eager() -> bool:
    """True when tensors are computed for real, now: not under ``torch.compile``/export, the
    JIT, a dispatch or torch-function mode (FakeTensor, make_fx) or a functorch transform.

    >>> eager()
    True
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active())


def content_key(*tensors: torch.Tensor) -> tuple | None:
    """What identifies the current content of ``tensors`` without reading it: object, storage
    and version counter of each (None when one of them has no version counter).

    >>> w = torch.zeros(2)
    >>> k = content_key(w)
    >>> k == content_key(w), (w.add_(1) is w) and k == content_key(w)
    (True, False)
    """
    try:
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)
    except (RuntimeError, NotImplementedError):  # inference tensors, tensors without storage
        return None


class _Pin:
    __slots__ = ("__weakref__",)


class _Entry:
    __slots__ = ("buf", "key", "pins")

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.key = None
        self.pins: weakref.WeakSet = weakref.WeakSet()


class ReusedWeight:
    """One layer's reusable weight-sized buffer (one per device, for DataParallel replicas).

    Copies and pickles of a layer start with an empty one.

    >>> r = ReusedWeight()
    >>> w = torch.randn(3)
    >>> buf = r.target(w)
    >>> r.store(torch.mul(w, 2, out=buf), content_key(w)) is buf
    True
    >>> r.lookup(w, content_key(w)) is buf, r.lookup(w.mul_(2), content_key(w))
    (True, None)
    """

    def __init__(self):
        self._entries: dict[torch.device, _Entry] = {}

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())

    def _entry(self, like: torch.Tensor) -> _Entry:
        e = self._entries.get(like.device)
        if e is None:
            e = self._entries[like.device] = _Entry()
        return e

    def lookup(self, like: torch.Tensor, key) -> torch.Tensor | None:
        """The buffer when it holds what ``key`` (from :func:`content_key`) describes, else None."""
        e = self._entries.get(like.device)
        if key is None or e is None or e.buf is None or e.key is None:
            return None
        buf = e.buf
        if buf.shape != like.shape or buf.dtype != like.dtype or e.key != (key, buf._version):
            return None
        return buf

    def target(self, like: torch.Tensor) -> torch.Tensor | None:
        """The buffer to overwrite (allocated on first use, or when ``like``'s shape, dtype or
        device changed), or None while a pending graph still needs its content."""
        e = self._entry(like)
        if len(e.pins):
            return None
        buf = e.buf
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or not buf.is_contiguous():
            with torch.inference_mode(False):  # an inference tensor could not be written later
                buf = e.buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        e.key = None  # its content is about to change
        return buf

    def store(self, buf: torch.Tensor, key) -> torch.Tensor:
        """Record that ``buf`` (from :meth:`target`) now holds what ``key`` describes."""
        e = self._entry(buf)
        if e.buf is buf and key is not None:
            e.key = (key, buf._version)
        return buf

    def pin(self, like: torch.Tensor) -> _Pin:
        """Keep the buffer from being overwritten until :meth:`unpin` or the returned pin dies
        (store it on the autograd ``ctx``: it dies with the graph)."""
        p = _Pin()
        self._entry(like).pins.add(p)
        return p

    def unpin(self, like: torch.Tensor, pin: _Pin | None) -> None:
        e = self._entries.get(like.device)
        if e is not None and pin is not None:
            e.pins.discard(pin)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` shares storage with one of the buffers."""
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return False
        return any(e.buf is not None and e.buf.untyped_storage().data_ptr() == ptr for e in self._entries.values())


_LOCAL = threading.local()


def scratch(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous temporary tensor shared by every layer of this thread (one backward node or
    one group update runs at a time per thread); valid until the next call with the same
    dtype and device. It grows to the largest size asked for and is never handed out beyond a
    backward or an update.

    >>> scratch((2, 3), torch.float32, torch.device("cpu")).shape
    torch.Size([2, 3])
    """
    store = getattr(_LOCAL, "store", None)
    if store is None:
        store = _LOCAL.store = {}
    key = (torch.device(device), dtype)
    n = 1
    for d in shape:
        n *= d
    flat = store.get(key)
    if flat is None or flat.numel() < n:
        with torch.inference_mode(False):
            flat = store[key] = torch.empty(n, dtype=dtype, device=device)
    return flat[:n].view(shape)


class Transient(dict):
    """A dict of per-layer speed state that copies and pickles of the layer start without.

    >>> import copy
    >>> t = Transient(a=torch.zeros(1))
    >>> copy.deepcopy(t), len(t)
    ({}, 1)
    """

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())
