"""Traced modules that stay instances of the class they were traced from.

A ``GraphModule`` built by :func:`traced_module` keeps its original class's other methods, plain
attributes and ``isinstance``, also through ``copy.deepcopy`` and pickling (see
:class:`TracedModule`). Split from ``passes.tracing``, which re-exports these names (pickles made
before the split name ``passes.tracing._unpickle_traced``).
"""
from __future__ import annotations

import copy
import hashlib
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

from .hooks import share_hooks

__all__ = ["TracedModule", "traced_module", "untraced", "original_class", "graph_fingerprint", "deepcopy_module"]


class TracedModule(fx.GraphModule):
    """A ``GraphModule`` that is still an instance of the class it was traced from.

    A parent whose forward is not traced (a fallback) calls its traced child as before, and may
    call the child's other methods too (a detection model calls ``self.head.compute_loss``); a
    plain ``GraphModule`` has lost them. :func:`traced_module` builds one per traced module: its
    class derives from this one and from the original class (``forward`` is the graph's), its
    ``__dict__`` keeps the original's attributes, and both survive ``copy.deepcopy`` and pickling.
    """

    _traced_from: type = nn.Module  # set on each per-class subclass

    def __call__(self, *args, **kwargs):
        notes = self.__dict__.get("_hook_notes")
        if notes is not None and notes.pending:  # a hook was registered on a module this graph inlines
            notes.check()
        guard = self.__dict__.get("_call_guard")
        adapted = guard.adapt(args, kwargs, self) if guard is not None else (args, kwargs)
        if adapted is None:
            # a call the graph was not traced for: the original forward, through Module.__call__
            # so hooks still run
            outer = self.__dict__.get("forward")  # a call nested in another eager call of this module
            self.__dict__["forward"] = lambda *a, **k: guard.eager(self, a, k)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                if outer is None:
                    self.__dict__.pop("forward", None)
                else:
                    self.__dict__["forward"] = outer
        out = super().__call__(*adapted[0], **adapted[1])
        kind = self.__dict__.get("_output_type")
        if kind is not None and type(out) is dict:  # the graph's dict back into the forward's type
            try:
                return kind(**out)
            except TypeError:
                return out
        return out

    def _deepcopy_init(self):
        # GraphModule's deepcopy rebuilds the module from a deep copy of __dict__ but keeps only
        # children, parameters and buffers, under the class name "GraphModule"
        name = type(self).__name__

        def init(res, fake_mod, graph):
            fx.GraphModule.__init__(res, fake_mod, graph, name)
            share_hooks(fake_mod.__dict__, res)  # torch's copy keeps the state_dict hooks only
            _keep_attributes(fake_mod.__dict__, res)
            _keep_non_persistent(fake_mod.__dict__, res)
        return init

    def __reduce__(self):
        fn, args = super().__reduce__()
        return _unpickle_traced, (self._traced_from, type(self).__name__, fn, args)


class _SequentialLayers:
    """``len``, indexing and iteration of a traced ``nn.Sequential``: the layers it was traced with
    (by name, so a layer swapped in since is the one returned), not the modules a rewrite added
    for the graph to call nor state attached to the model afterwards, which ``_modules`` also
    holds. ``model[-1]`` stays the head; an eager call of the container's own forward (a call its
    graph was not traced for) runs those layers only."""

    def _layer_items(self) -> list[tuple[str, nn.Module]]:
        names = self.__dict__.get("_layer_names")
        return list(self._modules.items()) if names is None else [(n, self._modules[n]) for n in names
                                                                  if n in self._modules]

    def __len__(self) -> int:
        return len(self._layer_items())

    def __iter__(self):
        return iter([m for _, m in self._layer_items()])

    def __getitem__(self, idx):
        items = self._layer_items()
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(items[idx]))
        return items[operator.index(idx)][1]

    def __setitem__(self, idx, module: nn.Module) -> None:
        setattr(self, self._layer_items()[operator.index(idx)][0], module)

    def __delitem__(self, idx) -> None:
        items = self._layer_items()
        gone = [n for n, _ in (items[idx] if isinstance(idx, slice) else [items[operator.index(idx)]])]
        for name in gone:
            delattr(self, name)
        self.__dict__["_layer_names"] = tuple(n for n, _ in items if n not in gone)


class _SkipOriginalInit(nn.Module):
    # sits between GraphModule and the original class in the MRO: GraphModule.__init__ calls
    # super().__init__(), which must not run the original constructor (it needs its arguments)
    def __init__(self):
        nn.Module.__init__(self)


_TRACED_CLASSES: dict[type, type] = {}


def _skip_call_frame() -> None:
    """Have ``torch.compile`` run :meth:`TracedModule.__call__` (glue: hook checks, the call
    guard, the output type) as plain Python and compile the graph's ``forward`` it calls, as it
    does for a plain ``GraphModule``. Compiled itself, that one function served every traced
    class in the process, guarded on the class: from the 9th sparsified model of a sweep on
    (``torch._dynamo.config.recompile_limit``) compiled models ran eager. Done when the first
    traced class is made (importing torch._dynamo costs about a second, not paid by ``import
    sparsify``)."""
    global _CALL_SKIPPED
    if _CALL_SKIPPED:
        return
    _CALL_SKIPPED = True
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # a torch without it: compile as before
        return
    skip_code(TracedModule.__call__.__code__)


_CALL_SKIPPED = False


def _traced_class(cls: type) -> type:
    """``TracedModule`` subclass that also derives from ``cls`` (cached per class)."""
    _skip_call_frame()
    if cls not in _TRACED_CLASSES:
        made = TracedModule
        # a subclass of a torch layer (a Conv2d with its own forward) stays a plain graph, so
        # isinstance checks for layer types never see a graph; Sequential is a container
        layer = any(b.__module__.startswith("torch.nn.modules") and b not in (nn.Module, nn.Sequential)
                    for b in cls.__mro__)
        if cls is not nn.Module and not issubclass(cls, fx.GraphModule) and not layer:
            try:
                view = (_SequentialLayers,) if issubclass(cls, nn.Sequential) else ()
                made = type(cls.__name__, (TracedModule, *view, _SkipOriginalInit, cls),
                            {"_traced_from": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
            except TypeError:  # metaclass or __init_subclass__ conflicts: keep the graph only
                made = TracedModule
        _TRACED_CLASSES[cls] = made
    return _TRACED_CLASSES[cls]


def traced_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The module that replaces ``root`` once its forward is ``graph``.

    It keeps ``root``'s children (all of them, not only those the graph calls), parameters,
    buffers and other attributes, and derives from ``root``'s class, so methods other than
    ``forward`` still work (a :class:`TracedModule`).

    >>> import torch
    >>> class Head(torch.nn.Module):
    ...     scale = 2.0
    ...     def forward(self, x):
    ...         return x.relu()
    ...     def loss(self, y):
    ...         return y.mean() * self.scale
    >>> head = Head()
    >>> gm = traced_module(head, torch.fx.Tracer().trace(head))
    >>> isinstance(gm, torch.fx.GraphModule), isinstance(gm, Head), float(gm.loss(gm(torch.ones(2))))
    (True, True, 2.0)
    """
    cls = _traced_class(getattr(type(root), "_traced_from", type(root)))  # a retrace keeps the class
    gm = cls(root, graph, type(root).__name__)
    if isinstance(root, nn.Sequential) and "_layer_names" not in root.__dict__:
        gm.__dict__["_layer_names"] = tuple(root._modules)  # a retrace keeps the first trace's (copied below)
    _keep_hierarchy(root, gm)
    share_hooks(root.__dict__, gm)  # hooks on the module that the graph replaces still run around its call
    _keep_attributes(root.__dict__, gm)
    # what the original module held, for untraced(): a retrace keeps the first trace's
    gm.__dict__["_original_members"] = root.__dict__.get("_original_members") or (
        tuple(root.__dict__), tuple(root._parameters), tuple(root._buffers), tuple(root._modules),
        getattr(type(root), "_traced_from", type(root)))
    for name in gm._buffers:
        if name not in root._buffers:
            # a tensor the forward made from code (fx's ``_tensor_constantN``, e.g. timm Swin's relative
            # position index): not state, so state_dict keeps the original's keys (a finalized model
            # loads into a freshly built one, and the other way round)
            gm._non_persistent_buffers_set.add(name)
    gm.training = root.training
    return gm


def untraced(gm: nn.Module) -> nn.Module | None:
    """An instance of the class ``gm`` was traced from, holding ``gm``'s current children,
    parameters, buffers, hooks and attributes of the original module (not the graph, nor the
    constants and modules the trace added): its own ``forward`` runs again. ``None`` when ``gm``
    was not made by :func:`traced_module` from a module of a class of its own. Its pickle names
    only that class.

    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return self.fc(x).relu()
    >>> net = Net()
    >>> plain = untraced(traced_module(net, torch.fx.Tracer().trace(net)))
    >>> type(plain) is Net, plain.fc is net.fc, isinstance(plain, torch.fx.GraphModule)
    (True, True, False)
    """
    cls = original_class(gm)
    if cls is None:
        return None
    keys, params, buffers, modules, _ = gm.__dict__["_original_members"]
    plain = cls.__new__(cls)
    body = {k: gm.__dict__[k] for k in keys if k in gm.__dict__}
    body["_parameters"] = {n: gm._parameters[n] for n in params if n in gm._parameters}
    body["_buffers"] = {n: gm._buffers[n] for n in buffers if n in gm._buffers}
    body["_modules"] = {n: gm._modules[n] for n in modules if n in gm._modules}
    body["_non_persistent_buffers_set"] = {n for n in gm._non_persistent_buffers_set if n in body["_buffers"]}
    body["training"] = gm.training
    plain.__dict__.update(body)
    return plain


def original_class(gm: nn.Module) -> type | None:
    """The class of the module :func:`traced_module` made ``gm`` from (a torch.nn class such as
    ``nn.TransformerDecoderLayer`` too, which is traced into a plain graph), when it has one of its
    own to give back: None for a plain ``nn.Module`` or a ``GraphModule``, and for what
    :func:`traced_module` did not make."""
    members = gm.__dict__.get("_original_members")
    cls = members[-1] if members is not None else None
    return None if cls is None or cls is nn.Module or issubclass(cls, fx.GraphModule) else cls


def graph_fingerprint(graph: fx.Graph) -> str:
    """A digest of ``graph``'s structure: each node's op, target and arguments (nodes by position).
    Two graphs with equal digests compute the same calls in the same order.

    >>> import torch
    >>> g = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU())).graph
    >>> graph_fingerprint(g) == graph_fingerprint(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU())).graph)
    True
    """
    index: dict[fx.Node, int] = {}
    parts = []
    for i, node in enumerate(graph.nodes):
        index[node] = i
        target = node.target if isinstance(node.target, str) else \
            f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', repr(node.target))}"
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        parts.append(f"{node.op}|{target}|{args!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _keep_non_persistent(src: dict, gm: nn.Module) -> None:
    """Buffers that were non-persistent in ``src`` (a module's ``__dict__``) stay so in ``gm``,
    rebuilt from it: torch before 2.14 registers the buffers of a copied or unpickled GraphModule
    as persistent, so the graph's constants (:func:`traced_module`) and a model's own
    non-persistent buffers (Llama's ``original_inv_freq``) turned into state_dict keys."""
    gm._non_persistent_buffers_set |= set(src.get("_non_persistent_buffers_set", ())) & set(gm._buffers)


def _keep_attributes(src: dict, gm: nn.Module) -> None:
    """Copy the plain attributes in ``src`` (a module's ``__dict__``) that ``gm`` lacks."""
    registered = (*gm._parameters, *gm._buffers, *gm._modules)
    for k, v in src.items():
        # an instance-level forward (a patched one) would shadow the graph's; a plain tensor named as a
        # buffer of ``gm`` would shadow that buffer (``.to(device)`` would not move what the graph reads);
        # fx's ``_tensor_constantN`` left on the root by an earlier trace are no attributes of the model
        if k in gm.__dict__ or k in ("forward", "__call__") or k in registered or k.startswith("_tensor_constant"):
            continue
        gm.__dict__[k] = v


def _unpickle_traced(original: type, name: str, fn, args) -> fx.GraphModule:
    plain = fn(*args)  # torch's own unpickling: a GraphModule holding every attribute
    body = next((a for a in args if isinstance(a, dict)), {})
    _keep_non_persistent(body, plain)
    # torch re-traces the code, running an exported graph's lift_fresh_copy of a constant: the copy
    # becomes a new buffer, a constant like the original's (non-persistent), not a state_dict key
    plain._non_persistent_buffers_set |= {n for n in plain._buffers if n.startswith("_tensor_constant")
                                          and n not in body.get("_buffers", {})}
    cls = _traced_class(original)
    gm = cls.__new__(cls)
    gm.__dict__.update(plain.__dict__)
    share_hooks(body, gm)  # torch rebuilt the module without its forward and backward hooks
    type(gm).__name__ = name
    gm.graph = plain.graph  # takes ownership and installs forward on gm's own class
    return gm


def _keep_hierarchy(root: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the root's own children, parameters and buffers.

    ``GraphModule`` rebuilds only the paths the graph uses, with plain ``Module`` containers;
    keeping the original objects keeps ``model.layer1[0]`` indexable, modules the graph does not
    call (e.g. heads used only in the other mode) and every state_dict key of the original.
    """
    for child_name, child in root.named_children():
        gm._modules[child_name] = child
    for pname, p in root._parameters.items():
        if pname not in gm._parameters:
            gm.register_parameter(pname, p)
    for bname, b in root._buffers.items():
        if bname not in gm._buffers:
            gm.register_buffer(bname, b, persistent=bname not in root._non_persistent_buffers_set)


def deepcopy_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, also for modules whose class's ``__getattr__`` hands
    unknown names to a child (PEFT's ``PeftModel`` and ``LoraModel`` to their base model):
    ``deepcopy`` looks ``__deepcopy__`` up on the instance, found a traced child's (a
    ``GraphModule``'s) and returned a copy of that child in the module's place. Such classes get
    ``__deepcopy__ = None`` (deepcopy's own way) while the copy is made.

    >>> class Forwarding(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.inner = fx.symbolic_trace(nn.Linear(2, 2))
    ...     def __getattr__(self, name):
    ...         try:
    ...             return super().__getattr__(name)
    ...         except AttributeError:
    ...             return getattr(self.inner, name)
    >>> type(copy.deepcopy(Forwarding())).__name__, type(deepcopy_module(Forwarding())).__name__
    ('GraphModule', 'Forwarding')

    A tensor a forward pre-hook left as a plain attribute (``torch.nn.utils.prune``'s and the old
    ``weight_norm``'s ``weight``, computed from parameters in a training forward) is no graph leaf,
    which ``deepcopy`` refuses: the copy gets it detached (the hook computes it again at each call).

    >>> conv = nn.utils.weight_norm(nn.Conv1d(2, 2, 3)); _ = conv(torch.ones(1, 2, 3))
    >>> deepcopy_module(conv).weight.grad_fn is None
    True
    """
    memo = {} if memo is None else memo
    for m in module.modules():
        for value in m.__dict__.values():
            if isinstance(value, torch.Tensor) and not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    patched = [cls for cls in {type(m) for m in module.modules()}
               if cls.__getattr__ is not nn.Module.__getattr__ and "__deepcopy__" not in vars(cls)
               and getattr(cls, "__deepcopy__", None) is None]
    for cls in patched:
        cls.__deepcopy__ = None
    try:
        return copy.deepcopy(module, memo)
    finally:
        for cls in patched:
            del cls.__deepcopy__
