"""The ``torch.fx`` tracer of :func:`passes.tracing.trace`: it goes only as deep as ``descend``
says, keeps ``self.training`` (and the other mode flags) a run-time read where it can, and names
the innermost module whose forward raised (the culprit turned into a leaf). Split from
``passes.tracing``, which re-exports ``_DepthTracer`` (pickled graphs name it there).
"""
from __future__ import annotations

import contextlib
import random
import sys
import warnings
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .calls import keep_argument_names
from .checkpoint_guard import refuse_checkpoint
from .grad_mode_guard import refuse_grad_modes
from .state_guard import MODE_FLAGS, refuse_state_writes  # MODE_FLAGS lives there: reproduce.py reads it too
from .example_answers import Example, ExampleAnswers
from .hooks import HOOK_DICTS, has_call_hooks
from .kept_calls import kept_calls
from .library_leaves import library_functions, library_leaf
from .proxy_reads import rank_reads, symbolic_type_info, values_not_callable

Descend = Callable[[str, nn.Module], bool]


class _DepthTracer(ExampleAnswers, fx.Tracer):
    # defaults: torch rebuilds a pickled GraphModule with a subclass of the tracer that made it
    def __init__(self, descend: Descend | None = None, forced_leaves: set[str] | None = None, prefix: str = "",
                 example: Example | None = None):
        super().__init__(autowrap_functions=library_functions())
        self.init_answers(example)
        self._descend = descend or (lambda name, m: True)
        self._forced = forced_leaves if forced_leaves is not None else set()
        self._prefix = prefix
        self.culprit: str | None = None
        self.modes: dict[fx.Node, tuple[tuple[str, str], bool]] = {}  # get_attr node of a mode flag -> ((path, flag), value)
        self.baked: dict[tuple[str, str], bool] = {}  # flags that Python control flow read: the graph holds one branch
        self._saved: list[tuple[nn.Module, str, bool]] = []
        self.output_type: type | None = None
        self.drew_random = False  # the forward drew from Python's random while traced (capture_graph)
        self.hooked: set[str] = set()  # modules kept as leaves for the hooks registered on them

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        def noting_output_type(*a):
            # a graph returns a dataclass-dict (transformers' ModelOutput, diffusers' BaseOutput)
            # as a plain dict: TracedModule turns it back into this type
            result = fn(*a)
            if isinstance(result, dict) and type(result) is not dict:
                self.output_type = type(result)
            return result
        out = noting_output_type, args
        if is_module:
            # `self.training` in any forward traced through reads a graph node, so train()/eval()
            # still switch it (F.dropout(x, p, training=self.training) stays live); the same for the
            # other MODE_FLAGS (a gradient-checkpointing switch turned on after sparsify)
            for name, m in self.root.named_modules():
                for flag in MODE_FLAGS:
                    value = m.__dict__.get(flag)
                    if isinstance(value, bool):
                        proxy = self.create_proxy("get_attr", f"{name}.{flag}" if name else flag, (), {})
                        self.modes[proxy.node] = ((name, flag), value)
                        self._saved.append((m, flag, value))
                        m.__dict__[flag] = proxy
        return out

    def trace(self, root, concrete_args=None):
        # torch also rebuilds an unpickled GraphModule with (a subclass of) this tracer: the modes
        # are put back here, not only by :func:`trace`, or the modules keep proxies as ``training``
        graph = None
        self.start_answers(root)
        try:
            with no_stored_proxies(root if isinstance(root, nn.Module) else None), symbolic_type_info(self), \
                    rank_reads(self), values_not_callable(), kept_calls(self, root):
                graph = super().trace(root, concrete_args)
            _unmark_torch_wrapped(graph)
            return graph
        finally:
            self.end_answers()
            self.restore_modes(graph)

    def restore_modes(self, graph: fx.Graph | None) -> None:
        for m, flag, value in self._saved:
            m.__dict__[flag] = value
        self._saved.clear()
        for node in list(graph.nodes) if graph is not None else ():
            if node in self.modes and not node.users:
                graph.erase_node(node)

    def to_bool(self, obj):
        # `if self.training:` cannot stay live in a graph: it takes the trace-time branch, and
        # the graph's CallGuard sends calls in the other mode to the module's own forward
        if obj.node in self.modes:
            key, value = self.modes[obj.node]
            self.baked[key] = value
            return value
        return self.answer_bool(obj, lambda: super(_DepthTracer, self).to_bool(obj))

    def _full(self, qualname: str) -> str:
        return f"{self._prefix}.{qualname}" if self._prefix else qualname

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._forced or super().is_leaf_module(m, module_qualified_name) or library_leaf(m):
            return True
        if not self._descend(self._full(module_qualified_name), m):
            return True
        if has_call_hooks(m):
            # a graph would run its code without calling it, and so without its hooks: it keeps
            # its call here and is traced on its own (passes.tracing.trace)
            self.hooked.add(module_qualified_name)
            return True
        return False

    def call_module(self, m, forward, args, kwargs):
        if self.evaluating or not self._installed(m):
            # a module made at call time (transformers' ``ACT2FN["gelu"](x)``) has no name to call
            # it by: its code is traced inline, as a function's would be
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the innermost module whose forward raised is the one to turn into a leaf
            if self.culprit is None:
                self.culprit = self.path_of_module(m)
            raise

    def buffer_proxy(self, name: str) -> fx.Proxy:
        """A graph read of the root's buffer ``name``: where an in-place write to it is recorded
        (:func:`passes.state_guard.refuse_state_writes`)."""
        return self.create_proxy("get_attr", name, (), {})

    def _installed(self, m: nn.Module) -> bool:
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True


def _unmark_torch_wrapped(graph: fx.Graph) -> None:
    """A node made by a ``torch.fx.wrap``-ed function of torch's own (``_assert_is_none``, met when
    a graph with a ``None`` argument is traced again: unpickling, a retrace) would make the code
    of ``graph`` call ``wrap("torch.fx._symbolic_trace._assert_is_none")``, a dotted name that
    every later trace in the process fails to look up (KeyError in torch.fx's patcher). torch's
    functions need no wrapping: the generated code calls them by module path."""
    for node in graph.nodes:
        if node.meta.get("is_wrapped") and str(getattr(node.target, "__module__", "")).startswith("torch."):
            del node.meta["is_wrapped"]


def _hold(result, caught: list) -> None:
    for w in caught:
        text = str(w.message).strip().splitlines()
        line = f"{w.category.__name__}: {text[0] if text else ''}"
        if line not in result.warnings:
            result.warnings.append(line)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@contextlib.contextmanager
def proxies_are_tensors() -> Iterator[None]:
    """While tracing, ``torch.is_tensor`` and ``torch.jit.isinstance(x, torch.Tensor)`` say True of
    a traced value: code that branches on them (diffusers' UNets: ``if not torch.is_tensor(t): t =
    torch.tensor([t])``; MONAI's ``UpCat`` concatenates its skip input only
    ``if torch.jit.isinstance(x_e, torch.Tensor)``) then records the tensor branch, not one for
    other values that fails on every real call or, worse, silently computes something else.

    >>> with proxies_are_tensors():
    ...     x = fx.Proxy(fx.Graph().placeholder("x"))
    ...     torch.is_tensor(x), torch.jit.isinstance(x, torch.Tensor), torch.jit.isinstance(x, int)
    (True, True, False)
    >>> torch.is_tensor(fx.Proxy(fx.Graph().placeholder("x")))
    False
    """
    is_tensor, jit_isinstance = torch.is_tensor, torch.jit.isinstance

    def traced_jit_isinstance(obj, target_type):
        if isinstance(obj, fx.Proxy):
            return isinstance(target_type, type) and issubclass(torch.Tensor, target_type)
        return jit_isinstance(obj, target_type)

    torch.is_tensor = lambda obj: isinstance(obj, (torch.Tensor, fx.Proxy))
    torch.jit.isinstance = traced_jit_isinstance
    try:
        yield
    finally:
        torch.is_tensor, torch.jit.isinstance = is_tensor, jit_isinstance


_MODULE_DICTS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


@contextlib.contextmanager
def no_stored_proxies(root: nn.Module | None) -> Iterator[None]:
    """Put back what a traced forward stored in its modules' attributes: a cache filled while
    traced holds proxies of a graph (timm's LeViT / EfficientFormerV2 cache their attention
    biases in eval mode), which a later forward would return instead of tensors, and a later
    trace would wire into its graph. Dictionaries are looked at in the modules and in the plain
    objects they hold (timm's FeatureHooks keys its outputs by ``x.device``: a proxy, traced)."""
    if root is None:
        yield
        return
    saved = [(m, dict(m.__dict__)) for m in root.modules()]
    dicts = [(d, dict(d)) for m in root.modules() for d in _stored_dicts(m)]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k, v in list(m.__dict__.items()):
                if isinstance(v, fx.Proxy):
                    if k in attrs:
                        m.__dict__[k] = attrs[k]
                    else:
                        del m.__dict__[k]
        for d, before in dicts:
            if any(isinstance(x, fx.Proxy) for item in d.items() for x in item):
                d.clear()
                d.update(before)


def _stored_dicts(m: nn.Module) -> Iterator[dict]:
    """The dictionaries a forward may fill: in ``m``'s attributes (not torch's own registries and
    hook dicts), and one level down in the plain objects it holds."""
    for k, v in m.__dict__.items():
        if k in _MODULE_DICTS or k in HOOK_DICTS:
            continue
        if isinstance(v, dict):
            yield v
        elif not isinstance(v, (nn.Module, torch.Tensor, type)) and isinstance(getattr(v, "__dict__", None), dict):
            yield from (d for d in vars(v).values() if isinstance(d, dict))


@contextlib.contextmanager
def python_draws() -> Iterator[list]:
    """Did the code inside draw from Python's ``random`` (or numpy's global generator)? The
    yielded list holds True afterwards if so; the generators are put back either way. A forward
    that draws there (LayerDrop written with ``random.random()``: fairseq, x-transformers) is
    traced with one fixed outcome: its graph would skip the same layers on every call."""
    np = sys.modules.get("numpy")
    before = random.getstate(), (np.random.get_state() if np is not None else None)
    drew: list = []
    try:
        yield drew
    finally:
        after = random.getstate(), (np.random.get_state() if np is not None else None)
        if after[0] != before[0] or (np is not None and not all(
                np.array_equal(a, b) if hasattr(a, "shape") else a == b for a, b in zip(after[1], before[1]))):
            drew.append(True)
        random.setstate(before[0])
        if np is not None:
            np.random.set_state(before[1])


@contextlib.contextmanager
def traced_under_guards(tracer: _DepthTracer, root: nn.Module) -> Iterator[list]:
    """What every trace of ``root`` by ``tracer`` runs inside (the capture and the retrace in the
    other mode alike): a graph would drop checkpointing and grad-mode switches, freeze writes to
    the module's state, and hold one fixed outcome of each Python draw (yielded: ``[True]`` when the
    forward drew one). The guards stand aside while the tracer runs real modules on example values."""
    tracing = lambda: not tracer.evaluating  # noqa: E731
    with refuse_checkpoint(root), refuse_grad_modes(tracing), refuse_state_writes(root, tracing, tracer.buffer_proxy), \
            proxies_are_tensors(), python_draws() as drew:
        yield drew


def capture_graph(root: nn.Module, descend: Descend, forced: set[str], prefix: str, concrete_args: dict | None,
                  caught: list, example: Example | None = None) -> tuple[_DepthTracer, fx.Graph | None, Exception | None]:
    """One trace of ``root`` with ``forced`` leaves: ``(tracer, graph, None)`` or ``(tracer, None,
    error)``; the warnings raised meanwhile are appended to ``caught``. ``example()`` gives
    ``root``'s inputs in the example call, for the ranks the forward reads (None: no example)."""
    tracer = _DepthTracer(descend, forced, prefix, example)
    graph = error = None
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                with traced_under_guards(tracer, root) as drew:
                    graph = tracer.trace(root, concrete_args or None)
            finally:
                caught.extend(seen)
                tracer.drew_random = bool(drew)
        keep_argument_names(graph, concrete_args or {})
    except Exception as exc:  # any tracing failure becomes a fallback, never a crash
        error, graph = exc, None
    finally:
        tracer.restore_modes(graph)
    return tracer, graph, error
