"""Which calls a graph captured by ``torch.export`` (:mod:`passes.export_capture`) serves, and
in what form: the exported graph takes its inputs as the example passed them, so a call that
names by keyword what the example passed by position (``unet(x, t, encoder_hidden_states=e)``
after ``example_inputs=(x, t, e)``) is put into the example's form first.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .calls import CallGuard

__all__ = ["ExportGuard"]

_VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _same(value, default) -> bool:
    """Is a passed ``value`` the parameter's ``default`` (what the example left it at)?"""
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor) or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:
        return False


class ExportGuard(CallGuard):
    """Which calls an exported graph serves: the example's input structure, each tensor with the
    same rank and dtype and the same size in every dimension but the dynamic ones (whose sizes
    must pass the export's own ``_guards_fn`` checks), every other input equal to the example's
    (``torch.export`` specialises on them); with ``modes`` set, the modules in the mode they had
    at capture too. Other calls run the module's own forward. A call with exactly the example's
    sizes fits whatever the export's checks say (the graph was checked to reproduce it there).

    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x
    >>> g = ExportGuard(Net.forward, ((torch.zeros(2, 3),), {}), {0: {0: ("s0", 2, 64)}})
    >>> g.fits((torch.zeros(5, 3),), {}), g.fits((torch.zeros(5, 4),), {}), g.fits((), {"x": torch.zeros(2, 3)})
    (True, False, False)
    """

    def __init__(self, forward, example: tuple, dynamic: dict[int, dict[int, tuple]], nodes=(),
                 modes: dict | None = None, checks=None):
        super().__init__(forward, {}, nodes, modes)
        flat, self.spec = pytree.tree_flatten(example)
        # dynamic: {leaf: {dim: (symbol, low, high)}}; dims sharing a symbol must stay equal
        self.leaves = [(x.dim(), x.dtype, tuple(s for i, s in enumerate(x.shape) if i not in dynamic.get(j, {})),
                        dict(dynamic.get(j, {}))) if isinstance(x, torch.Tensor) else ("value", x)
                       for j, x in enumerate(flat)]
        self.checks = checks  # torch.export's _guards_fn (not picklable: dropped by pickling)
        # the graph reproduces the forward at the example's own sizes (export_trace checks that),
        # also where the export's guards, written for the doubled batch of a batch-one example,
        # refuse them (a relation such as ``a.size(0) + b.size(0) - (1 + a.size(0) + b.size(0)) // 2 != 1``)
        self.example_shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in flat)
        self.layout = self._layout(forward, example)

    @staticmethod
    def _layout(forward, example: tuple):
        """``(names passed by position, names passed by keyword)`` in the example, or None when
        the signature cannot say (``*args``, an unreadable signature, an example that passed
        keys to ``**kwargs``). A ``**kwargs`` the example left empty stays so: transformers'
        ``forward(pixel_values=None, labels=None, **kwargs)`` is served by keyword too."""
        try:
            sig = inspect.signature(forward)
            params = list(sig.parameters.values())[1:]
            bound = sig.bind(None, *example[0], **example[1])
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_POSITIONAL or (p.kind is p.VAR_KEYWORD and p.name in bound.arguments)
               for p in params):
            return None
        given = list(bound.arguments)[1:]
        return tuple(given[:len(example[0])]), tuple(given[len(example[0]):])

    def _bound(self, args: tuple, kwargs: dict):
        """``(signature, the call's arguments by name)``, or ``(signature, None)`` when forward
        refuses the call (its own forward raises the right TypeError)."""
        sig = self.__dict__.get("_signature")
        if sig is None:  # read once per guard (a call of the model root per training step)
            sig = self.__dict__["_signature"] = inspect.signature(self.forward)
        try:
            return sig, sig.bind(None, *args, **kwargs).arguments
        except TypeError:
            return sig, None

    def adapt(self, args: tuple, kwargs: dict, module: nn.Module | None = None):
        """The call in the example's form when the graph serves it, else None: arguments named
        by keyword that the example passed by position (or the reverse) are moved; an argument
        the example left at its default must be left there (or passed as that default), and a
        ``**kwargs`` empty."""
        layout = self.__dict__.get("layout")  # None: pickled before calls were adapted
        if layout is not None:
            sig, given = self._bound(args, kwargs)
            if given is None:
                return None
            pos, kw = layout
            for name, p in list(sig.parameters.items())[1:]:
                # a **kwargs that got keys has no default to equal: the graph never saw them
                if name in given and name not in pos and name not in kw and not _same(given[name], p.default):
                    return None
            value = lambda name: given[name] if name in given else sig.parameters[name].default  # noqa: E731
            args, kwargs = tuple(value(n) for n in pos), {n: value(n) for n in kw}
        return (args, kwargs) if self.fits(args, kwargs, module) else None

    def misfit(self, args: tuple, kwargs: dict) -> str:
        """Why the exported graph does not serve the call ``(args, kwargs)``, and a fix that works.

        >>> class Head(torch.nn.Module):
        ...     def forward(self, pixel_values=None, labels=None, **kwargs):
        ...         return pixel_values
        >>> g = ExportGuard(Head.forward, ((torch.zeros(2, 3),), {}), {})
        >>> g.misfit((), {"pixel_values": torch.zeros(2, 3), "labels": torch.zeros(2)}).split(" (")[0]
        'it passes labels, which example_inputs left out'
        """
        layout = self.__dict__.get("layout")
        sig, given = self._bound(args, kwargs)
        shaped = "pass example_inputs shaped like this call"
        if layout is None or given is None:
            if kwargs and any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
                return ("the exported graph takes the example's positional inputs, and a forward with *args gives "
                        "keyword arguments no place among them: pass them by position, as the example did")
            return f"its inputs differ from the example's in structure, rank, dtype or a fixed size: {shaped}"
        pos, kw = layout
        fx = ("; or sparsify with capture=\"fx\" (docs/capture.md), whose graphs serve calls with and without "
              "such arguments")
        params = list(sig.parameters.values())[1:]
        keys = [k for p in params if p.kind is p.VAR_KEYWORD for k in given.get(p.name, {})]
        if keys:
            var = next(p.name for p in params if p.kind is p.VAR_KEYWORD)
            return (f"it passes {_listed(keys)} to **{var}, which the exported graph does not take (torch.export "
                    f"captured the example's named inputs only): leave {_them(keys)} out of the call" + fx)
        extra = [p.name for p in params if p.name in given and p.kind not in _VAR and p.name not in pos + kw
                 and not _same(given[p.name], p.default)]
        if extra:
            return (f"it passes {_listed(extra)}, which example_inputs left out (the exported graph computes with "
                    f"the example's arguments only): add {_them(extra)} to example_inputs, if every call that "
                    "matters passes " + _them(extra) + fx)
        missing = [n for n in pos + kw if n not in given]
        if missing:
            return (f"it leaves out {_listed(missing)}, which example_inputs passed (the exported graph needs "
                    f"{_them(missing)}): leave {_them(missing)} out of example_inputs, if no call that matters passes "
                    + _them(missing) + fx)
        return f"its inputs differ from the example's in rank, dtype or a fixed size: {shaped}"

    def fits(self, args: tuple, kwargs: dict, module: nn.Module | None = None) -> bool:
        if module is not None and self.off_mode(module) is not None:
            return False
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.spec:
            return False
        sizes: dict[str, int] = {}
        for x, leaf in zip(flat, self.leaves):
            if leaf[0] == "value":
                if isinstance(x, torch.Tensor) or type(x) is not type(leaf[1]) or x != leaf[1]:
                    return False
                continue
            ndim, dtype, fixed, dynamic = leaf
            if not isinstance(x, torch.Tensor) or x.dim() != ndim or x.dtype != dtype:
                return False
            if tuple(s for i, s in enumerate(x.shape) if i not in dynamic) != fixed:
                return False
            for i, (symbol, low, high) in dynamic.items():
                # torch.export specialises sizes 0 and 1 away (ranges start at 2) yet its graphs
                # serve them, as torch's own input checks allow
                if not (0 if low <= 2 else low) <= x.shape[i] <= high:
                    return False
                if sizes.setdefault(symbol, x.shape[i]) != x.shape[i]:
                    return False
        if self.checks is not None:  # torch.export's own checks (relations between sizes too)
            try:
                self.checks(*flat)
            except Exception:
                shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in flat)
                return shapes == self.__dict__.get("example_shapes")
        return True

    def __getstate__(self):
        state = super().__getstate__()
        state["checks"] = None
        state.pop("_signature", None)  # read again after loading (defaults need not pickle)
        return state


def _listed(names: list) -> str:
    return ", ".join(names[:4]) + ("..." if len(names) > 4 else "")


def _them(names: list) -> str:
    return "it" if len(names) == 1 else "them"
