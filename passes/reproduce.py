"""Does a traced graph compute what the module's own forward computes on real inputs?

``torch.fx`` runs a forward on proxies: Python that asks a question a proxy answers differently
from a tensor (``isinstance(x, torch.Tensor)``, ``type(x) is Tensor``, a check through a C
function) silently records the other branch, and the graph then computes something else than the
model, with no error. :func:`reproduces` runs the module and its graph on the same inputs (copies
of them), from the same random state and buffers, and compares the outputs; :mod:`passes.tracing`
treats a graph that does not reproduce its module like one that could not be traced.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import random
from collections.abc import Mapping
from typing import Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from .state_guard import MODE_FLAGS

__all__ = ["same_outputs", "reproduces"]


def _rtol(dtype: torch.dtype, rtol: float) -> float:
    """``rtol``, or a few units of rounding of a half-precision dtype (another kernel choice on a
    GPU rounds differently there)."""
    return max(rtol, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else rtol


def _tensor_same(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.layout != torch.strided or b.layout != torch.strided or a.is_nested or b.is_nested:
        return True  # not compared: nothing the check could trust to be elementwise equal
    if a.is_floating_point() or a.is_complex():
        return torch.allclose(a, b, rtol=_rtol(a.dtype, rtol), atol=atol, equal_nan=True)
    return torch.equal(a, b)


def same_outputs(a, b, rtol: float = 1e-4, atol: float = 1e-5, _depth: int = 0) -> bool:
    """Are two forward outputs the same? Tensors by value (shape, dtype, device, then close),
    tuples / lists / mappings / dataclasses by structure and elements, numbers and strings by
    ``==``. Other objects (a transformers ``DynamicCache``) are not compared: their identity
    differs between any two forwards.

    >>> same_outputs((torch.ones(2), {"n": 1}), [torch.ones(2), {"n": 1}])
    True
    >>> same_outputs({"logits": torch.ones(2)}, {"logits": torch.zeros(2)})
    False
    >>> same_outputs(torch.ones(2), torch.ones(3))
    False
    """
    if _depth > 50:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _tensor_same(a, b, rtol, atol)
    if a is None or b is None or isinstance(a, (bool, int, float, complex, str, bytes)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_outputs(a[k], b[k], rtol, atol, _depth + 1) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_outputs(x, y, rtol, atol, _depth + 1) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(same_outputs(getattr(a, f.name), getattr(b, f.name), rtol, atol, _depth + 1)
                   for f in dataclasses.fields(a))
    return True


@contextlib.contextmanager
def kept_state(module: nn.Module) -> Iterator[None]:
    """Buffers (running statistics, caches), number attributes of the modules (a call counter; not
    the mode flags) and the random generators (torch's, CUDA's once it is initialised, Python's) as
    they were, whatever runs inside: on exit the values the buffers had on entry are copied back
    into them (in place), the numbers set back, and the generators' states set back.

    >>> bn = nn.BatchNorm1d(2)  # in train mode: a forward moves its running statistics
    >>> with kept_state(bn):
    ...     _ = bn(torch.arange(8.0).reshape(4, 2))
    ...     drawn = torch.rand(3)
    >>> bn.running_mean.tolist(), int(bn.num_batches_tracked), bool(torch.equal(torch.rand(3), drawn))
    ([0.0, 0.0], 0, True)
    >>> observer = torch.ao.quantization.PerChannelMinMaxObserver()  # resizes its buffers from empty
    >>> with kept_state(observer):
    ...     _ = observer(torch.ones(3, 2))
    >>> tuple(observer.min_val.shape)
    (0,)
    """
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    numbers = [(m, {k: v for k, v in vars(m).items() if type(v) in (int, float, bool) and k not in MODE_FLAGS})
               for m in module.modules()]
    cpu, py = torch.random.get_rng_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape != saved.shape:  # resized in place (a per-channel observer's min_val, from empty)
                    b.resize_(saved.shape)
                b.copy_(saved)
        for m, saved in numbers:
            m.__dict__.update(saved)
        torch.random.set_rng_state(cpu)
        random.setstate(py)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _fingerprint(out) -> list:
    """What :func:`reproduces` keeps of a leaf module's output: shapes, dtypes and two sums per
    tensor (keeping the tensors would hold every activation of the forward)."""
    prints = []
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_nested:
            v = t.detach()
            v = v.abs() if v.is_complex() else v
            # float32 sums (cascaded on a CPU, a tree on a GPU) are exact to far below the
            # tolerance, without the double copy of every activation (a fifth of a check's time)
            acc = torch.float32 if v.is_floating_point() and v.dtype != torch.float64 else torch.float64
            v = v if v.is_floating_point() else v.to(acc)
            prints.append((tuple(t.shape), t.dtype, torch.stack((v.sum(dtype=acc), v.abs().sum(dtype=acc)))))
    return prints


@contextlib.contextmanager
def _leaf_trail(gm: nn.Module) -> Iterator[list]:
    """The fingerprints of every call of a module the graph calls (its leaves), in call order: a
    graph can compute something else in the middle (a branch it dropped) while the outputs still
    agree on these inputs (a ReLU zeroing both versions). The module's own forward calls the
    same module objects."""
    trail: list = []
    graph = getattr(gm, "graph", None)
    leaves = {id(m): m for n in (graph.nodes if graph is not None else ()) if n.op == "call_module"
              for m in [gm.get_submodule(n.target)]}
    hooks = [m.register_forward_hook(lambda m, a, out: trail.append(_fingerprint(out))) for m in leaves.values()]
    try:
        yield trail
    finally:
        for h in hooks:
            h.remove()


def _trails_same(a: list, b: list, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Same calls, shapes and dtypes, and sums that agree up to ``rtol`` of the absolute sum (a
    BatchNorm output sums to about zero: its signed sum is all rounding)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if len(x) != len(y) or any(sx != sy or dx != dy for (sx, dx, _), (sy, dy, _) in zip(x, y)):
            return False
        for (_, dtype, u), (_, _, v) in zip(x, y):
            scale = atol + _rtol(dtype, rtol) * torch.maximum(u[1], v[1])
            if bool(((u - v).abs() > scale).any()) or bool(u.isnan().any() != v.isnan().any()):
                return False
    return True


@torch.no_grad()
def reproduces(module: nn.Module, gm: nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """Does ``gm`` (the graph traced of ``module``, sharing its submodules) compute what
    ``module(*args, **kwargs)`` computes, in the module's current mode: the same outputs, and the
    same outputs of every module the graph calls (in the same order)? ``None`` when that
    cannot be told: the module's own forward raises on these inputs, they cannot be copied, or
    the weights are not materialised (``meta``). Both calls start from the same buffers and
    random state, each on its own deep copy of the inputs (a forward may change them in place, a
    transformers cache grows), and everything is put back afterwards.

    >>> import torch.fx as fx
    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         return x * 2 if isinstance(x, torch.Tensor) else x   # a proxy is no Tensor
    >>> reproduces(Net(), fx.symbolic_trace(Net()), (torch.ones(3),), {})
    False
    """
    if _on_meta(module):
        return None
    try:
        inputs = [copy.deepcopy((args, kwargs)) for _ in range(2)]
    except Exception:
        return None
    with kept_state(module), _leaf_trail(gm) as expected_trail:
        try:
            expected = module(*inputs[0][0], **inputs[0][1])
        except Exception:
            return None
    with kept_state(module), _leaf_trail(gm) as trail:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # a GraphModule prints where its code raised
                got = gm(*inputs[1][0], **inputs[1][1])
        except Exception:
            return False
    return same_outputs(expected, got) and _trails_same(expected_trail, trail)
