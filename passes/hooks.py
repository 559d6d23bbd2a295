"""Module hooks across a trace.

A graph runs the code of every module it was traced through without calling that module, so
``nn.Module`` hooks on it would never run. Three rules keep hooks honest:

- a module that carries hooks when traced keeps its own call (:func:`has_call_hooks`: the tracer
  makes it a leaf, then traces it on its own), so its hooks run;
- the module that replaces a traced root shares the root's hook dictionaries
  (:func:`share_hooks`), so hooks on the model itself run, and their handles still remove them;
- a hook registered later on a module a graph runs the code of makes the model's next call warn
  (:func:`guard_graphs`), instead of being ignored silently.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

from .module_stack import traced_through

__all__ = ["CALL_HOOKS", "HOOK_DICTS", "has_call_hooks", "share_hooks", "remove_hooks", "kept_hooks", "guard_graphs",
           "unguard_called", "is_inlined", "InlinedHooks", "HookNotes"]

#: the hook dictionaries that act around a module's call (a graph that inlines the module skips them)
CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
#: every hook dictionary of ``nn.Module`` (torch 2.11 to 2.14), shared by :func:`share_hooks`
HOOK_DICTS = (*CALL_HOOKS, "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_is_full_backward_hook", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def has_call_hooks(module: nn.Module) -> bool:
    """Whether a hook that runs around ``module``'s call is registered on it.

    >>> m = nn.Sequential(nn.ReLU())
    >>> has_call_hooks(m), m.register_forward_hook(lambda *a: None) is not None, has_call_hooks(m)
    (False, True, True)
    """
    return any(module.__dict__.get(name) for name in CALL_HOOKS)


def share_hooks(src: dict, dst: nn.Module) -> None:
    """Give ``dst`` the very hook dictionaries in ``src`` (a module's ``__dict__``; not copies: the
    handles of hooks registered on that module remove them from ``dst`` too). Dictionaries ``dst``
    already fills are kept.

    >>> a, b = nn.Sequential(), nn.Sequential()
    >>> handle = a.register_forward_hook(lambda m, i, o: o + 1)
    >>> share_hooks(a.__dict__, b); int(b(0))
    1
    >>> handle.remove(); int(b(0))
    0
    """
    for name in HOOK_DICTS:
        if name in src and not dst.__dict__.get(name):
            dst.__dict__[name] = src[name]


def remove_hooks(module: nn.Module, kind: str, *functions) -> None:
    """Remove from ``module``'s hook dictionary ``kind`` (``"_forward_pre_hooks"``, ...) the hooks
    that are one of ``functions``, also when registered wrapped (``with_module=True`` load hooks).

    >>> def noop(module, args):
    ...     return None
    >>> m = nn.ReLU(); _ = m.register_forward_pre_hook(noop); remove_hooks(m, "_forward_pre_hooks", noop)
    >>> len(m._forward_pre_hooks)
    0
    """
    hooks = module.__dict__.get(kind, {})
    for key, hook in list(hooks.items()):
        if any(f in (hook, getattr(hook, "hook", None), getattr(hook, "__wrapped__", None)) for f in functions):
            del hooks[key]


def kept_hooks(model: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo that keeps the hooks registered on ``model``'s modules as they are:
    a copy of the model then calls the caller's hook objects (one that records outputs records
    them where the caller reads them), not copies of them. A hook the model holds itself (one of
    its modules' methods, or an object a module keeps as an attribute) is copied with the model.

    >>> import copy
    >>> class Keep:
    ...     def __call__(self, module, args, out):
    ...         self.seen = True
    >>> m, keep = nn.Sequential(nn.ReLU()), Keep()
    >>> _ = m[0].register_forward_hook(keep)
    >>> c = copy.deepcopy(m, kept_hooks(m)); _ = c(torch.ones(1)); keep.seen
    True
    """
    # the model's own objects: its modules and what they hold (timm's FeatureHookNet keeps the
    # FeatureHooks whose methods are its hooks, and reads their outputs from it)
    own = {id(v) for m in model.modules() for v in (m, *m.__dict__.values())}
    memo: dict[int, object] = {}
    for module in model.modules():
        for name in CALL_HOOKS:
            for hook in module.__dict__.get(name, {}).values():
                bound = getattr(hook, "__self__", getattr(getattr(hook, "func", None), "__self__", None))  # a partial's
                if id(hook) not in own and (bound is None or id(bound) not in own):
                    memo[id(hook)] = hook
    return memo


class HookNotes:
    """What the guards of one model share: the guards a hook was registered on since the model's
    last call, and whether the model has warned. The warning waits for a call (:meth:`check`):
    a tool that registers hooks on every module and removes them unused (Lightning's model
    summary) says nothing wrong."""

    def __init__(self):
        self.pending: list[InlinedHooks] = []
        self.told = False

    def check(self) -> None:
        """Warn, once per model, when a hook registered on an inlined module is still there."""
        pending, self.pending = self.pending, []
        held = next((guard for guard in pending if guard), None)
        if held is not None and not self.told:
            self.told = True
            warnings.warn(
                f"sparsify: a hook registered on `{held.where}` does not run: the traced graph runs that "
                "module's code without calling it (the layers inside it, Conv/Linear/activations, are still "
                "called). Register it before sparsify(...), whose torch.fx capture then keeps that module's own "
                "call, or hook a layer inside it (further such hooks on this model are not reported)", stacklevel=3)


class InlinedHooks(OrderedDict):
    """The hook dictionary of a module that a graph runs the code of: a hook registered on it is
    noted, and the model's next call warns (:class:`HookNotes`) if it is still registered."""

    def __init__(self, where: str, notes: HookNotes, *args):
        self.where, self.notes = where, notes  # first: the hooks given in ``args`` are noted too
        super().__init__(*args)

    def __setitem__(self, key, value):
        if not self.notes.told:
            self.notes.pending.append(self)
        super().__setitem__(key, value)

    def __reduce__(self):
        # rebuilt without noting the hooks again: they were noted when registered
        return _rebuild, (self.where, self.notes, list(self.items()))


def _rebuild(where: str, notes: HookNotes, items: list) -> InlinedHooks:
    guard = InlinedHooks(where, notes)
    for key, value in items:
        OrderedDict.__setitem__(guard, key, value)
    return guard


def is_inlined(module: nn.Module) -> bool:
    """Whether a graph runs ``module``'s code without calling it (:func:`guard_graphs` marked it):
    a hook on it would not run."""
    return isinstance(module.__dict__.get("_forward_hooks"), InlinedHooks)


def guard_graphs(graphs: dict[str, fx.GraphModule]) -> None:
    """Make every module whose code one of ``graphs`` (qualified name in the model -> graph, as in
    ``TraceResult.graphs``) runs note the hooks registered on it; each graph module gets the notes
    as ``_hook_notes``, which a :class:`~passes.traced.TracedModule` checks when called: one
    warning for the whole model.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.ReLU())))
    >>> guard_graphs({"": gm}); is_inlined(gm.get_submodule("0"))
    True
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     _ = gm.get_submodule("0").register_forward_hook(lambda *a: None)
    ...     _ = gm.get_submodule("0").register_forward_pre_hook(lambda *a: None)
    ...     gm._hook_notes.check()
    >>> [str(w.message)[:47] for w in seen]
    ['sparsify: a hook registered on `0` does not run']
    """
    notes = HookNotes()
    for prefix, gm in graphs.items():
        gm.__dict__["_hook_notes"] = notes
        for path, module in _inlined(gm):
            where = f"{prefix}.{path}" if prefix else path
            for name in CALL_HOOKS:
                current = module.__dict__.get(name)
                if current is not None and not isinstance(current, InlinedHooks):
                    module.__dict__[name] = InlinedHooks(where, notes, current)


def _inlined(gm: fx.GraphModule):
    """``(path, module)`` of each module whose code ``gm``'s graph runs, where the path still
    names one (a graph torch.export captured names modules its own way; a finalized graph may no
    longer hold one)."""
    for path in traced_through(gm.graph):
        try:
            yield path, gm.get_submodule(path)
        except AttributeError:
            continue


def unguard_called(root: nn.Module) -> None:
    """Plain hook dictionaries again on the modules of ``root`` that no graph in it runs the code
    of (called again, after ``finalize`` gave a module its own forward back): their hooks run. A
    hook registered while guarded keeps running, but its handle no longer removes it.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.ReLU())))
    >>> guard_graphs({"": gm}); plain = nn.Sequential(gm.get_submodule("0")); unguard_called(plain)
    >>> type(plain[0]._forward_hooks).__name__
    'OrderedDict'
    """
    inlined = {id(module) for gm in root.modules() if isinstance(gm, fx.GraphModule) for _, module in _inlined(gm)}
    for module in root.modules():
        if id(module) in inlined:
            continue
        for name in CALL_HOOKS:
            current = module.__dict__.get(name)
            if isinstance(current, InlinedHooks):
                module.__dict__[name] = OrderedDict(current)
