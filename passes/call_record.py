"""How each submodule is called in one forward with example inputs (:class:`CallRecord`): the
arguments a child traced on its own is specialised to, and the order and inputs of the calls
(:class:`CallSpan`, for :func:`passes.ends.model_ends`).
"""
from __future__ import annotations

import functools
import inspect
import itertools
import weakref
from typing import NamedTuple

import torch
from torch import nn

from .calls import _OTHER, _is_torch_leaf
from .reproduce import kept_state

__all__ = ["CallRecord", "CallSpan"]


class CallSpan(NamedTuple):
    """When one forward called a module: indices of its first and last call among all module
    calls, and a token for the tensor each of those calls got first (equal tokens: one and the
    same tensor object, so neither call's input came out of the other)."""

    first: int
    last: int
    first_input: int | None
    last_input: int | None


class CallRecord:
    """How each submodule of ``root`` is called, from one forward with ``example_inputs``.

    A child traced on its own because its parent does not trace would otherwise treat every
    argument as a tensor input: ``if token_type_ids is None:`` is then decided at trace time,
    wrongly when the parent passes ``None``. :meth:`concrete_args` gives the arguments that were
    ``None`` (or one and the same ``bool``) in every recorded call, for ``torch.fx`` to
    specialise on; the traced graph asserts that later calls pass the same. The forward runs
    lazily (at the first question), without gradients, in the root's mode (eval if that fails);
    buffers and the random generator are restored afterwards.

    >>> import torch
    >>> class Emb(torch.nn.Module):
    ...     def forward(self, ids, types=None):
    ...         return ids if types is None else ids + types
    >>> class Model(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.emb = Emb()
    ...     def forward(self, ids):
    ...         return self.emb(ids, types=None)
    >>> CallRecord(Model(), (torch.zeros(2),)).concrete_args("emb", Emb())
    {'types': None}
    """

    def __init__(self, root: nn.Module, example_inputs: tuple):
        self._root = root
        self._inputs = tuple(example_inputs)
        self._calls: dict[str, list[dict]] | None = None
        self._order: dict[str, CallSpan] = {}
        self._held: dict[str, tuple[tuple, dict]] = {}
        self._missed: set[str] = set()  # held for, but not called in the example forward
        self._vouched: dict[tuple[str, bool], list[frozenset[str]]] = {}

    def call_order(self) -> dict[str, CallSpan]:
        """``{qualified name: CallSpan}`` for every submodule the example forward called (empty
        when it failed): the order an untraceable parent calls its children in, and which of
        them read the same tensor (:func:`passes.ends.model_ends`)."""
        if self._calls is None:
            self._calls = self._record()
        return self._order

    def concrete_args(self, qualname: str, module: nn.Module) -> dict:
        """``{argument: value}`` of ``module.forward`` that were None or one bool in every call."""
        if self._calls is None:
            self._calls = self._record()
        seen = self._calls.get(qualname)
        if not seen:
            return {}
        out = {}
        for name in seen[0]:
            values = [c.get(name, _OTHER) for c in seen]
            first = values[0]
            if first is not _OTHER and all(v is first for v in values):
                out[name] = first
        return out

    def root_concrete_args(self) -> dict:
        """The root's own arguments that the example call leaves at a ``None`` or ``bool``
        default (or passes as one): a graph of the root traced for that call (timm's ViT,
        ``forward(x, attn_mask=None, is_causal=False)``, called with ``x`` alone).

        >>> class Net(torch.nn.Module):
        ...     def forward(self, x, mask=None, causal=False, scale=2.0):
        ...         return x
        >>> CallRecord(Net(), (torch.zeros(1),)).root_concrete_args()
        {'mask': None, 'causal': False}
        """
        try:
            bound = inspect.signature(self._root.forward).bind(*self._inputs)
        except (TypeError, ValueError):
            return {}
        bound.apply_defaults()
        return {name: v for name, v in bound.arguments.items()
                if (v is None or isinstance(v, bool))
                and bound.signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                  inspect.Parameter.VAR_KEYWORD)}

    def _record(self) -> dict[str, list[dict]]:
        calls: dict[str, list[dict]] = {}
        hooks = []
        order: dict[str, CallSpan] = {}
        count, tokens = itertools.count(), itertools.count()
        seen: dict[int, tuple[weakref.ref, int]] = {}  # id of a live input tensor -> its token

        def token(args, kwargs):
            t = next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if t is None:
                return None
            ref, tok = seen.get(id(t), (None, None))
            if ref is None or ref() is not t:  # a new tensor (perhaps at a freed one's address)
                tok = next(tokens)
                seen[id(t)] = (weakref.ref(t), tok)
            return tok

        def called(name, module, args, kwargs):
            i, tok = next(count), token(args, kwargs)
            before = order.get(name)
            order[name] = CallSpan(before.first if before else i, i, before.first_input if before else tok, tok)

        def hook(name, module, args, kwargs):
            try:
                bound = inspect.signature(module.forward).bind(*args, **kwargs)
            except (TypeError, ValueError):
                return
            bound.apply_defaults()
            summary = {}
            for pname, param in bound.signature.parameters.items():
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                v = bound.arguments.get(pname)
                summary[pname] = v if v is None or isinstance(v, bool) else _OTHER
            calls.setdefault(name, []).append(summary)

        for name, m in self._root.named_modules():
            if name:
                hooks.append(m.register_forward_pre_hook(functools.partial(called, name), with_kwargs=True))
            if name and not _is_torch_leaf(m):
                hooks.append(m.register_forward_pre_hook(functools.partial(hook, name), with_kwargs=True))

        def reset():
            calls.clear()
            order.clear()
        self._forward_once(hooks, reset)  # no record when it fails: children are traced unspecialised
        self._order = order
        return calls

    def _forward_once(self, hooks: list, reset) -> None:
        """One example forward without gradients in the root's mode, or in eval mode when that
        fails (a detection model wants targets in training mode); ``reset()`` clears what a
        failed attempt recorded. Removes ``hooks`` and restores buffers, random state and mode."""
        mode = self._root.training
        try:
            with torch.no_grad(), kept_state(self._root):
                try:
                    self._root(*self._inputs)
                except Exception:
                    reset()
                    try:
                        self._root.eval()(*self._inputs)
                    except Exception:
                        reset()
        finally:
            for h in hooks:
                h.remove()
            self._root.train(mode)

    def hold_inputs(self, names: list[str]) -> None:
        """Keep the arguments of the first call of each named submodule in one example forward,
        for :meth:`inputs` (a graph traced of it is checked on them, passes/reproduce.py). Only
        the modules about to be traced are held, not every module's, to keep memory small."""
        wanted = [n for n in names if n not in self._held and n not in self._missed]
        if not wanted:
            return
        held: dict[str, tuple[tuple, dict]] = {}

        def hold(name, module, args, kwargs):
            held.setdefault(name, (args, kwargs))
        hooks = []
        for name in wanted:
            try:
                m = self._root.get_submodule(name)
            except AttributeError:
                continue
            hooks.append(m.register_forward_pre_hook(functools.partial(hold, name), with_kwargs=True))
        self._forward_once(hooks, held.clear)
        self._held.update(held)
        self._missed.update(n for n in wanted if n not in held)

    def inputs(self, qualname: str, module: nn.Module) -> tuple[tuple, dict] | None:
        """``(args, kwargs)`` that ``module`` (the root or a submodule) was called with in the
        example forward; None when it was not called. A submodule's are handed out once, held
        by an earlier :meth:`hold_inputs` or else by an example forward of their own."""
        if module is self._root:
            return self._inputs, {}
        if qualname not in self._held:
            self.hold_inputs([qualname])
        return self._held.pop(qualname, None)

    def vouch(self, qualname: str, through: frozenset[str]) -> None:
        """The graph of the module at ``qualname``, which traced through the modules ``through``
        (paths from it), reproduced its forward in the root's current mode."""
        self._vouched.setdefault((qualname, self._root.training), []).append(through)

    def vouched(self, qualname: str, through: frozenset[str] | None = None) -> bool:
        """Does a graph of ``qualname`` that traces through ``through`` need no check? It does not
        when one that traced through all of those (and perhaps more) reproduced: a module that now
        runs its own forward (a leaf) computes what that graph's part of it did. Without
        ``through``: was any graph of it vouched for?"""
        graphs = self._vouched.get((qualname, self._root.training), [])
        return bool(graphs) if through is None else any(through <= g for g in graphs)
