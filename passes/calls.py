"""How a module is called: checked on every later call of a graph traced for one way of calling
it (:class:`CallGuard`; recorded from one forward by :class:`passes.call_record.CallRecord`).

``torch.fx`` decides ``if mask is None:`` once, at trace time: a graph traced with ``mask`` as a
tensor is wrong for a call that leaves it out, and one traced with ``mask=None`` is wrong for a
call that passes it. A :class:`CallGuard` remembers which arguments the trace took as ``None``,
as a fixed ``bool`` or as a value, and sends every call that does not fit to the module's own
Python ``forward`` (whose submodules are the same objects the graph calls), so a traced module
answers every call its original accepted.
"""
from __future__ import annotations

import inspect
import warnings

import torch
import torch.fx as fx
from torch import nn

from .library_leaves import library_leaf

__all__ = ["CallGuard", "call_shell", "keep_argument_names", "skipped_edit_calls"]

_OTHER = object()  # a recorded argument value that is neither None nor a flag
_SKIPPED = [0]  # calls that ran a module's own forward past nodes added to its graph, process-wide


def skipped_edit_calls() -> int:
    """How many calls so far ran a traced module's own forward, skipping nodes added to its graph
    (a call with arguments the graph was not traced for): a caller compares two readings."""
    return _SKIPPED[0]

#: mode flags that switch activation checkpointing (timm's, transformers' older models')
CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


class _Absent:  # an argument the call left out
    pass


def _is_torch_leaf(m: nn.Module) -> bool:
    """A module every trace keeps whole: torch.nn's own, or a library's (passes/library_leaves.py)."""
    return fx.Tracer().is_leaf_module(m, "") or library_leaf(m)


class CallGuard:
    """Which calls a graph traced from ``forward`` with ``fixed`` arguments computes correctly.

    ``fixed`` maps argument names to the ``None`` or ``bool`` the trace specialised on; every other
    named argument was a graph input (any value but ``None`` fits; the trace took ``x is None`` as
    false). A ``*args`` traced with ``var_count`` items (the example call's: ``x, y = args`` takes
    two) must come with that many, none ``None``, like named inputs. Other extra positional or
    keyword arguments fit only when absent or ``None``, except the keys of a ``**kwargs`` the trace
    read (``var_keys``), which must all come with a value. ``nodes`` are the graph's node names at
    trace time, to tell later edits apart.

    >>> def forward(self, x, mask=None, scale=True): ...
    >>> g = CallGuard(forward, {"mask": None})
    >>> g.fits((1,), {}), g.fits((1, 2), {}), g.fits((1,), {"scale": False}), g.fits((None,), {})
    (True, False, True, False)
    """

    def __init__(self, forward, fixed: dict, nodes=(), modes: dict | None = None, ranks: dict | None = None,
                 var_keys: tuple | None = None, var_count: int | None = None):
        self.forward = forward  # the original Python forward, called unbound on the traced module
        params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
        self.names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.kwonly = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
        # what leaving an argument out passes: None, a flag, "value" (any other) or "required"
        self.defaults = {p.name: (p.default if p.default is None or isinstance(p.default, bool) else
                                  "required" if p.default is p.empty else "value") for p in params}
        self.fixed = dict(fixed)
        self.nodes = frozenset(nodes)
        # {(submodule path, flag name): value} of the mode flags (MODE_FLAGS) the graph took a branch on
        self.modes = _mode_keys(modes or {})
        # {argument: rank} of tensor arguments whose rank the forward read in Python (`*x.shape`)
        self.ranks = dict(ranks or {})
        # the keys a `**kwargs` argument was traced with (None: it was not read), which every call
        # must pass with a value, and no others but None
        self.var_keys = None if var_keys is None else frozenset(var_keys)
        # how many items a `*args` argument was traced with (None: not known, and a call passing
        # any fits none): unpacking `x, y = args` holds the count in the graph
        self.var_count = var_count
        self._warned: set = set()

    @classmethod
    def for_module(cls, module: nn.Module, fixed: dict, graph: fx.Graph, modes: dict | None = None,
                   ranks: dict | None = None, var_keys: tuple | None = None,
                   example=None) -> CallGuard | None:
        """The guard for ``module`` traced into ``graph`` (``modes``: the ``training`` flags its
        control flow read; ``ranks``: the ranks of arguments it read; ``var_keys``: the ``**kwargs``
        keys the trace read; ``example()``: the example call's ``(args, kwargs)`` or None, asked
        for the count of ``*args`` items the graph holds); None when no call could
        misfit (every argument required, no ``*args``/``**kwargs``, no mode or rank read) or the
        forward is not a plain function."""
        old = module.__dict__.get("_call_guard")
        modes, ranks = dict(modes or {}), dict(ranks or {})
        if old is not None:  # a retrace of a traced module: its graph was specialised already
            forward, fixed, modes = old.forward, {**old.fixed, **fixed}, {**old.modes, **modes}
            ranks = {**getattr(old, "ranks", {}), **ranks}
            var_keys = var_keys if var_keys is not None else getattr(old, "var_keys", None)
        else:
            forward = getattr(type(module), "forward", None)
            if not inspect.isfunction(forward):
                return None
        try:
            guard = cls(forward, fixed, (n.name for n in graph.nodes), modes, ranks, var_keys)
        except (TypeError, ValueError):  # a signature inspect cannot read
            return None
        params = list(inspect.signature(forward).parameters.values())[1:]
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            inputs = example() if example is not None else None
            guard.var_count = (max(len(inputs[0]) - len(guard.names), 0) if inputs is not None
                               else getattr(old, "var_count", None))
        if not guard.fixed and not guard.modes and not guard.ranks and all(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                   for p in params):
            return None
        return guard

    def off_mode(self, module: nn.Module) -> tuple[str, str] | None:
        """The first ``(path, flag)`` whose value now differs from the branch the graph holds. A
        checkpointing switch matters only to a training forward with gradients: anywhere else
        the graph computes what the other branch would (nothing is saved for a backward)."""
        training = module.training and torch.is_grad_enabled()
        for (path, flag), value in self.modes.items():
            if flag in CHECKPOINT_FLAGS and not training:
                continue
            if getattr(module.get_submodule(path) if path else module, flag, value) is not value:
                return path, flag
        return None

    def fits(self, args: tuple, kwargs: dict, module: nn.Module | None = None) -> bool:
        """Does the call ``(args, kwargs)`` of ``module`` take the path the graph was traced on?"""
        if module is not None and self.off_mode(module) is not None:
            return False
        n, var = len(self.names), self.var_count or 0
        if var and (len(args) < n + var or any(a is None for a in args[n:n + var])):
            return False
        if len(args) > n + var and any(a is not None for a in args[n + var:]):
            return False
        for i, name in enumerate(self.names):
            if not self._fits(name, args[i] if i < len(args) else kwargs.get(name, _Absent), i < len(args)):
                return False
        for name in self.kwonly:
            if not self._fits(name, kwargs.get(name, _Absent), False):
                return False
        named = set(self.names[len(args):]) | set(self.kwonly)
        extra = {k for k, v in kwargs.items() if k not in named and v is not None}
        return extra == (self.var_keys or frozenset())

    def adapt(self, args: tuple, kwargs: dict, module: nn.Module | None = None):
        """``(args, kwargs)`` to call the graph with, or None when the call needs the module's
        own forward (:class:`passes.export_guard.ExportGuard` reorders them)."""
        return (args, kwargs) if self.fits(args, kwargs, module) else None

    def misfit(self, args: tuple, kwargs: dict) -> str:
        """What differs in a call the graph does not serve, and the fix, for the warning of
        :meth:`eager`: a traced graph is specialised to how the example inputs called it."""
        return "pass example_inputs that call it this way"

    def _fits(self, name: str, value, positional: bool) -> bool:
        rank = self.ranks.get(name)
        if rank is not None and isinstance(value, torch.Tensor) and value.dim() != rank:
            return False
        if not positional and value is _Absent:
            default = self.defaults.get(name, "required")
            if default == "required":
                return False  # the original forward raises the right TypeError
            value = default if default is None or isinstance(default, bool) else _Absent
        if name not in self.fixed:  # a graph input
            return value is not None
        return value is self.fixed[name]

    def added(self, module: nn.Module, training: bool) -> list[str]:
        """Nodes added to ``module``'s graph after the trace that a call in that mode computes
        with (a module that says it is an identity outside training, an activation regularizer,
        counts only in training): what its own forward would skip."""
        graph = getattr(module, "graph", None)
        return sorted(n.name for n in graph.nodes if n.name not in self.nodes and n.op == "call_module"
                      and (training or not getattr(module.get_submodule(str(n.target)), "identity_in_eval", False))
                      ) if graph is not None else []

    def eager(self, module: nn.Module, args: tuple, kwargs: dict):
        """Run the original forward on ``module`` (warning once per call pattern when the graph
        holds edits that this call therefore skips)."""
        graph = getattr(module, "graph", None)
        if graph is not None:
            added = self.added(module, module.training)
            mode = self.off_mode(module)
            key = (len(args), tuple(sorted(kwargs)), mode)
            if added and mode is not None and mode[1] in CHECKPOINT_FLAGS:
                raise RuntimeError(
                    f"sparsify: {type(module).__name__} has {'.'.join(p for p in mode if p)}=True, a branch its "
                    f"graph was not traced on, so its own forward would run without the nodes sparsify inserted "
                    f"({', '.join(added[:4])}{'...' if len(added) > 4 else ''}) and the recipe would not apply: "
                    "turn checkpointing on before sparsify() (timm: model.set_grad_checkpointing(True)), which "
                    "rewrites the model block by block with each block checkpointed, or leave it off")
            _SKIPPED[0] += bool(added)
            if added and key not in self._warned:
                self._warned.add(key)
                flag = None if mode is None else getattr(module.get_submodule(mode[0]) if mode[0] else module, mode[1])
                why = ("with arguments its graph was not traced for" if mode is None else
                       f"in {'train' if module.training else 'eval'} mode, which its graph's control flow did not take"
                       if mode[1] == "training" else f"with {mode[1]}={flag}, which its graph's control flow did not take")
                warnings.warn(f"{type(module).__name__} was called {why}; its own forward runs, without the "
                              f"nodes added to its graph ({', '.join(added[:4])}{'...' if len(added) > 4 else ''})"
                              + ("" if mode is not None else f": {self.misfit(args, kwargs)}"),
                              stacklevel=3)
        return self.forward(module, *args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_warned"] = set()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.modes = _mode_keys(state.get("modes") or {})
        self.ranks = state.get("ranks") or {}  # guards pickled before ranks were read
        self.var_keys = state.get("var_keys")
        self.var_count = state.get("var_count")


def _mode_keys(modes: dict) -> dict:
    """``modes`` keyed by ``(path, flag)``; a bare path is the ``training`` flag (guards pickled
    before other flags were followed)."""
    return {(k if isinstance(k, tuple) else (k, "training")): v for k, v in modes.items()}


def keep_argument_names(graph: fx.Graph, concrete_args: dict) -> None:
    """Give placeholders of ``concrete_args`` their argument names back: fx names them
    ``<name>_<n>``, which breaks callers that pass them by keyword (BertModel calls its embeddings
    with ``token_type_ids=...``)."""
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        base, _, count = str(node.target).rpartition("_")
        if base in concrete_args and count.isdigit() and base not in taken:
            node.target = base
            taken.add(base)


class CallShell(fx.GraphModule):
    """A graph that only calls the module it holds (see :func:`call_shell`)."""

    @property
    def shell_of(self) -> str:
        """The attribute name of the held module: the graph's first module call (nodes a method
        inserts come after it). Read from the graph, so copies of the shell know it too."""
        return next(n.target for n in self.graph.nodes if n.op == "call_module")


def call_shell(module: nn.Module, name: str) -> fx.GraphModule:
    """A ``GraphModule`` holding ``module`` as child ``name`` whose graph calls it once on its one
    input: an activation module called by an untraceable parent becomes a node that methods can
    insert after, while the parent still calls ``parent.<name>(x)``.

    >>> shell = call_shell(torch.nn.GELU(), "act")
    >>> [n.op for n in shell.graph.nodes], float(shell(torch.zeros(1)))
    (['placeholder', 'call_module', 'output'], 0.0)
    """
    holder = nn.Module()
    holder.add_module(name, module)
    graph = fx.Graph()
    x = graph.placeholder("input")
    graph.output(graph.call_module(name, (x,)))
    gm = CallShell(holder, graph, f"{type(module).__name__}Shell")
    gm.training = module.training
    return gm
