"""The one buffer facility: per-layer reusable tensors, one thread-local workspace, one eager rule.

Every method that computes a weight-sized or activation-sized tensor in every step (ST-3, GMP,
STR, N:M, SAS, the penalty kernels) takes its memory from here instead of allocating: on CPU a
fresh large tensor costs several times the arithmetic that fills it (its pages are new to the
process every time: ``w * m`` is ~10x slower than ``torch.mul(w, m, out=buf)`` on ResNet-18's
11 M weights; docs/performance.md).

* :func:`layer_buffers` gives a layer its :class:`LayerBuffers`: named tensors, one per device
  (DataParallel replicas, ``.to()``), kept outside the module (keyed weakly by it), so
  ``state_dict``, ``copy.deepcopy``, pickles, DDP's buffer broadcast and ``.to()`` never see them;
* a buffer's content is reused without recomputing only while the tensors it was computed from
  are the same objects at the same version and the buffer itself was not written since
  (:func:`content_key`; :meth:`LayerBuffers.cached`);
* a buffer handed out to an autograd graph is *pinned* (:meth:`LayerBuffers.pin`) until that
  graph's backward ran or the graph was freed; while pinned, :meth:`LayerBuffers.target` says
  None and the caller computes into a fresh tensor. Whatever a caller holds is an alias sharing
  the buffer's version counter, so a graph that saved it and is backpropagated after a rewrite
  fails loudly (PyTorch's "modified by an inplace operation") instead of using the new values;
* :func:`workspace`: temporaries that never leave one backward node, one forward op or one group
  update, shared by every layer of a thread; reused on CPU, fresh on other devices (their caching
  allocators recycle memory already, and a kept activation-sized workspace would hold memory
  the allocator could give to others);
* :func:`eager` is the one rule for "may a layer reuse or cache now": never while a tracer or
  transform records the forward (a tracer would capture buffers as constants);
* a *transient* :class:`LayerBuffers` (:meth:`LayerBuffers.make_transient`) keeps nothing: every
  buffer it hands out is a fresh tensor, nothing is cached. For layers whose weight FSDP2 shards
  (:func:`sparsify.core.sharded.note_fsdp`): full-size buffers kept on every rank would cost more
  than the rank's parameter shards (docs/distributed.md, "Memory under FSDP2").
"""
from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["LayerBuffers", "layer_buffers", "content_key", "eager", "workspace", "release_workspaces",
           "workspace_bytes"]


def eager() -> bool:
    """True when tensors are computed for real, right now: not under ``torch.compile``/export,
    the JIT, a dispatch mode (FakeTensor, make_fx), a torch-function mode other than a default
    device (``torch.set_default_device``, ``with torch.device(...)``: buffers name their device)
    or a functorch transform. Only then may a layer reuse buffers or return cached tensors.

    >>> eager()
    True
    >>> with torch.device("cpu"):
    ...     eager()
    True
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._is_torch_function_mode_enabled():
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
        return all(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())
    return True


def content_key(*tensors: torch.Tensor) -> tuple | None:
    """What identifies the current content of ``tensors`` without reading it: object, storage
    and version counter of each (None when one of them has no version counter).

    In-place writes that bypass the version counter (``.data``, some fused optimizers, raw
    collectives) are not seen: the methods that cache drop their caches on every ``sparsify.step``.

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
    """Held by an autograd ``ctx`` while its graph may still read a buffer."""
    __slots__ = ("pins", "__weakref__")

    def __init__(self, pins: weakref.WeakSet):
        self.pins = pins
        pins.add(self)

    def release(self) -> None:
        self.pins.discard(self)


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # an inference tensor could not be written with history later
        return torch.empty(like.shape, dtype=dtype, device=like.device)


class LayerBuffers:
    """One layer's named buffers (one per name and device) and its cached values.

    >>> b = LayerBuffers()
    >>> w = torch.randn(3)
    >>> buf = b.target("eff", w)
    >>> b.store("eff", torch.mul(w, 2, out=buf), w) is buf
    True
    >>> b.cached("eff", w) is buf, b.cached("eff", w.mul_(2))
    (True, None)
    """

    __slots__ = ("_bufs", "_cache", "_pins", "state", "transient", "__weakref__")

    def __init__(self):
        self._bufs: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._cache: dict[str, tuple[torch.Tensor, tuple]] = {}
        self._pins: dict[tuple[str, torch.device], weakref.WeakSet] = {}
        self.state: dict = {}  # other per-layer speed state (never saved or copied)
        self.transient = False  # keep nothing between calls (make_transient)

    def make_transient(self) -> None:
        """From now on keep nothing: :meth:`buffer` and :meth:`target` give fresh tensors and
        :meth:`store` caches nothing; what is held now is freed. Callers that fill :attr:`state`
        free it with ``clear(free=True)``.

        >>> b = LayerBuffers(); w = torch.zeros(2)
        >>> b.make_transient(); b.buffer("x", w) is b.buffer("x", w), b.held()
        (False, [])
        """
        self.clear(free=True)
        self.transient = True

    def buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The layer's tensor ``name`` shaped like ``like``, on its device, in ``dtype`` (default
        ``like``'s), kept between calls for writing with ``out=``; content: whatever was last written.
        Pins are not consulted: for writes that happen only between steps (group updates)."""
        dtype = like.dtype if dtype is None else dtype
        if self.transient:
            return _empty(like, dtype)
        key = (name, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != dtype or not buf.is_contiguous():
            buf = self._bufs[key] = _empty(like, dtype)
        return buf

    def target(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """:meth:`buffer`, or None while a pending graph still needs its content (:meth:`pin`)."""
        pins = self._pins.get((name, like.device))
        if pins is not None and len(pins):
            return None
        return self.buffer(name, like, dtype)

    def pin(self, name: str, like: torch.Tensor) -> _Pin:
        """Keep buffer ``name`` (on ``like``'s device) from :meth:`target` until the returned pin is
        released or dies (store it on the autograd ``ctx``: it dies with the graph)."""
        pins = self._pins.get((name, like.device))
        if pins is None:
            pins = self._pins[(name, like.device)] = weakref.WeakSet()
        return _Pin(pins)

    def cached(self, name: str, *sources: torch.Tensor) -> torch.Tensor | None:
        """The value last stored under ``name`` if neither it nor any of ``sources`` changed since
        (same objects, storage and version counters), else None."""
        entry = self._cache.get(name)
        if entry is None:
            return None
        value, key = entry
        return value if key == content_key(value, *sources) else None

    def store(self, name: str, value: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        """Remember ``value`` as computed from ``sources`` in their current state."""
        key = None if value.is_inference() or self.transient else content_key(value, *sources)
        if key is not None:
            self._cache[name] = (value, key)
        return value

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` shares storage with one of the buffers."""
        if not self._bufs or t.device.type == "meta":
            return False
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return False
        return any(b.device == t.device and b.untyped_storage().data_ptr() == ptr for b in self._bufs.values())

    def names(self) -> list[str]:
        """The names of the buffers held (any device), sorted.

        >>> b = LayerBuffers(); _ = b.buffer("x", torch.zeros(2)); b.names()
        ['x']
        """
        return sorted({name for name, _ in self._bufs})

    def held(self) -> list[torch.Tensor]:
        """Every tensor kept between calls: buffers, cached values, tensors in :attr:`state`.

        >>> b = LayerBuffers(); _ = b.buffer("x", torch.zeros(2)); [t.shape for t in b.held()]
        [torch.Size([2])]
        """
        cached = [v for v, _ in self._cache.values()]
        return [*self._bufs.values(), *cached, *(v for v in self.state.values() if isinstance(v, torch.Tensor))]

    def clear(self, free: bool = False) -> None:
        """Forget the cached values (``free``: the buffers, pins and state too)."""
        self._cache.clear()
        if free:
            self._bufs.clear()
            self._pins.clear()
            self.state.clear()


_LAYERS: "weakref.WeakKeyDictionary[object, LayerBuffers]" = weakref.WeakKeyDictionary()


def layer_buffers(layer, create: bool = True) -> LayerBuffers | None:
    """The :class:`LayerBuffers` of ``layer`` (made on first use; None if there are none and
    ``create`` is false). Copies and pickles of the layer start without any.

    >>> lin = torch.nn.Linear(2, 2)
    >>> layer_buffers(lin) is layer_buffers(lin), layer_buffers(torch.nn.Linear(2, 2), create=False)
    (True, None)
    """
    b = _LAYERS.get(layer)
    if b is None and create:
        b = _LAYERS[layer] = LayerBuffers()
    return b


_LOCAL = threading.local()


def workspace(shape, dtype: torch.dtype, device: torch.device, index: int = 0) -> torch.Tensor:
    """A contiguous temporary of ``shape``, valid until the next call with the same ``dtype``,
    ``device`` and ``index`` in this thread (one backward node, forward op or group update runs at
    a time per thread; ``index`` tells apart temporaries of one op that live together).

    On CPU one flat buffer per thread and key, grown to the largest size asked for and shared by
    every layer; on other devices a fresh tensor (see the module docstring). Free the CPU ones
    with :func:`release_workspaces`.

    >>> workspace((2, 3), torch.float32, torch.device("cpu")).shape
    torch.Size([2, 3])
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    store = getattr(_LOCAL, "store", None)
    if store is None:
        store = _LOCAL.store = {}
    n = 1
    for d in shape:
        n *= d
    key = (dtype, index)
    flat = store.get(key)
    if flat is None or flat.numel() < n:
        with torch.inference_mode(False):
            flat = store[key] = torch.empty(n, dtype=dtype, device=device)
    return flat[:n].view(shape)


def release_workspaces() -> None:
    """Free the calling thread's workspaces.

    >>> release_workspaces()
    """
    _LOCAL.store = {}


def workspace_bytes() -> int:
    """Bytes held by the calling thread's workspaces (:func:`workspace`).

    >>> release_workspaces(); workspace_bytes()
    0
    """
    store = getattr(_LOCAL, "store", None) or {}
    return sum(t.untyped_storage().nbytes() for t in store.values())
