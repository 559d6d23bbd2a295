"""Keep writes to module state live in traced graphs, or out of them.

A forward that updates its module's state (a hand-written running mean:
``self.rmean.mul_(0.9).add_(...)``, a counter ``self.calls += 1``, timm's ``BatchNormAct2d``
counting ``num_batches_tracked``) is run once while ``torch.fx`` traces it: a write made on the real
buffer happens then, on the real module (which shares its tensors with the user's model), and
the graph holds nothing of it, or a constant computed from the trace-time value, so the
statistic never accumulates. While :func:`refuse_state_writes` is active:

* an in-place write to a buffer itself (``add_``, ``mul_``, ``copy_``, ``+=``, ``buf[i] = v``) is
  not run but recorded in the graph, on the buffer's ``get_attr`` node: each call of the graph
  writes it, as each call of the forward does;
* a write the graph cannot hold raises :class:`StateWriteInGraph` *before* it happens: to a
  buffer whose value real code read at trace time (``0.9 * self.rmean``: that read would be a
  constant), to a view of a buffer, to a parameter, with ``out=``, an assignment of a buffer or
  parameter, or of a number attribute (``int``, ``float``, ``bool``; not the mode flags the tracer
  reads). The tracer then makes the writing module a leaf that runs its own forward (a fallback,
  reported with this reason).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["StateWriteInGraph", "refuse_state_writes", "MODE_FLAGS"]

_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                     "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}
#: module attributes that switch a forward's behaviour like ``training`` does: a graph follows the
#: value they had at trace time, and a call made with another value runs the module's own forward
#: (``grad_checkpointing``: timm's switch; ``gradient_checkpointing``: transformers')
MODE_FLAGS = ("training", "grad_checkpointing", "gradient_checkpointing")


class StateWriteInGraph(RuntimeError):
    """Raised while tracing by a write to a module's buffers, parameters or number attributes."""


def _why(what: str) -> str:
    return (f"writes module state in its forward ({what}), which a traced graph would run once at trace time and "
            "freeze: this module runs its own forward")


def _storage(t: torch.Tensor) -> int:
    """Where ``t``'s storage lives, 0 where that says nothing (meta, empty, a tensor subclass
    without a storage of its own)."""
    if t.is_meta or t.numel() == 0:
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _writes_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


class _Refuse(TorchFunctionMode):
    def __init__(self, tensors: dict[int, tuple[str, bool]], storages: dict[int, str], active: Callable[[], bool],
                 record: Callable[[str], fx.Proxy] | None):
        super().__init__()
        self.tensors, self.storages, self.active, self.record = tensors, storages, active, record
        self.read: set[str] = set()  # buffers real code read at trace time (their value became a constant)
        self.written: set[str] = set()  # buffers whose writes the graph holds
        self.results: dict[int, tuple[fx.Proxy, str]] = {}  # id(proxy) -> (proxy, buffer) of those writes

    def _state(self, t) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        base = t
        while base._base is not None:
            base = base._base
        if id(base) in self.tensors:
            return self.tensors[id(base)][0]
        ptr = _storage(t)  # .data, or a view made without autograd, shares the storage only
        return self.storages.get(ptr) if ptr else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active():
            return func(*args, **kwargs)
        target = kwargs.get("out") if "out" in kwargs else (args[0] if args and _writes_in_place(func) else None)
        name = self._state(target) if target is not None else None
        what = getattr(func, "__name__", str(func))
        if name is None:
            leaves = pytree.tree_leaves((args, kwargs))
            if not any(isinstance(a, fx.Proxy) for a in leaves):  # a graph op reads a buffer by get_attr
                for a in leaves:
                    if (read := self._state(a)) is not None:
                        if read in self.written:
                            raise StateWriteInGraph(_why(f"{what} reads {read} after writing it"))
                        self.read.add(read)
            return func(*args, **kwargs)
        buffer = self.tensors.get(id(target), ("", False))[1]
        if self.record is None or not buffer or "out" in kwargs or name in self.read:
            raise StateWriteInGraph(_why(f"{what} on {name}" + (" after reading it" if name in self.read else "")))
        self.written.add(name)
        proxy = self.record(name)
        # a node of its own: the unbound method refuses a proxy as self, and ``+=`` then falls back
        # to ``+``, a read of the buffer at trace time
        out = proxy.tracer.create_proxy("call_method", what, (proxy, *args[1:]), kwargs)
        self.results[id(out)] = (out, name)
        return out


@contextlib.contextmanager
def refuse_state_writes(root: nn.Module, active: Callable[[], bool] = lambda: True,
                        record: Callable[[str], fx.Proxy] | None = None) -> Iterator[None]:
    """While inside, and ``active()`` holds (a tracer says False while it runs real modules on
    example values), code that writes the state of ``root``'s modules (see the module docstring)
    writes nothing: ``record(qualified buffer name)``, the tracer's proxy of that buffer, takes an
    in-place write to it into the graph; other writes (all of them without ``record``) raise
    :class:`StateWriteInGraph`.

    >>> class Counting(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("calls", torch.zeros((), dtype=torch.long))
    ...     def forward(self, x):
    ...         self.calls += 1
    ...         return x * 2
    >>> m = Counting()
    >>> with refuse_state_writes(m):
    ...     torch.fx.symbolic_trace(m)
    Traceback (most recent call last):
    ...
    passes.state_guard.StateWriteInGraph: writes module state in its forward (add_ on calls), which a traced graph would run once at trace time and freeze: this module runs its own forward
    >>> int(m.calls)
    0
    >>> tracer = torch.fx.Tracer()
    >>> with refuse_state_writes(m, record=lambda name: tracer.create_proxy("get_attr", name, (), {})):
    ...     gm = torch.fx.GraphModule(m, tracer.trace(m))
    >>> _ = gm(torch.ones(1)), gm(torch.ones(1))
    >>> int(m.calls)
    2
    """
    tensors: dict[int, tuple[str, bool]] = {}
    storages: dict[int, str] = {}
    for is_buffer, named in ((False, root.named_parameters(remove_duplicate=False)),
                             (True, root.named_buffers(remove_duplicate=False))):
        for name, t in named:
            if t is None:
                continue
            tensors[id(t)] = (name, is_buffer)
            if ptr := _storage(t):
                storages[ptr] = name
    watched = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
    setattr_ = nn.Module.__setattr__
    mode = _Refuse(tensors, storages, active, record)

    def refusing_setattr(self, name, value):
        if id(self) in watched and name not in MODE_FLAGS and active():
            path = f"{watched[id(self)]}.{name}" if watched[id(self)] else name
            if name in self._buffers and mode.results.get(id(value), (None, ""))[1] == path:
                return  # ``self.calls += 1``: the graph writes the buffer itself, which stays in place
            old = self.__dict__.get(name)
            # type first: a traced value compared with != would be a question to the tracer
            number = isinstance(old, (int, float)) and (type(value) is not type(old) or value != old)
            if name in self._buffers or name in self._parameters or number:
                raise StateWriteInGraph(_why(f"assigns {name}"))
        setattr_(self, name, value)
    nn.Module.__setattr__ = refusing_setattr
    try:
        with mode:
            yield
    finally:
        nn.Module.__setattr__ = setattr_
