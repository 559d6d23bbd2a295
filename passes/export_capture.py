"""A second capture path, for forwards ``torch.fx`` cannot trace: ``torch.export`` in training mode.

``torch.export.export(..., strict=False)`` runs the forward on fake tensors, so Python control
flow on shapes, loops over sizes, ``isinstance`` checks and other code that a ``torch.fx`` proxy
rejects are simply executed. Its graph holds ATen ops; :func:`export_trace` turns it into a graph
the rest of the library reads as it reads a ``torch.fx`` one (:mod:`passes.export_module_calls`):

* every call of a torch leaf module (``Conv2d``, ``BatchNorm2d``, ``ReLU``, ``Dropout``...) whose
  ops form one single-input, single-output group becomes a ``call_module`` node of the *original*
  module again, so weight methods swap it and train/eval switch it as under ``torch.fx``;
* the ``training`` argument that the trace fixed in the remaining ``batch_norm`` / ``dropout``
  ops (``F.dropout(x, p, training=self.training)`` in a custom forward) becomes a run-time read of
  the owning module's ``training`` flag;
* ATen activations are called through their ``torch`` functions (``aten.relu`` -> ``torch.relu``),
  the targets the activation methods look for.

The module returned is a :class:`~passes.tracing.TracedModule` around the root's own children,
parameters and buffers (same ``state_dict`` keys). Its :class:`ExportGuard` sends every call the
graph was not captured for (another input structure, dtype, rank or fixed size) to the module's
own forward. Shapes: every dimension of every tensor input is exported as ``Dim.AUTO``, dynamic
unless the forward needs a fixed size (a Python branch on it, a reshape to a constant) or the
example has size 1 there (a batch of one is doubled for the export, so the batch stays dynamic).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .call_inputs import input_tuple
from .export_module_calls import _collapse_leaves, _live_modes, _torch_level
from .checkpoint_guard import refuse_checkpoint
from .grad_mode_guard import refuse_unrecorded_grad_modes
from .export_guard import ExportGuard  # also where pickles made before the split find it
from .traced import _keep_attributes, _keep_hierarchy, _traced_class
from .depth_tracer import _DepthTracer, _first_line, _hold
from .reproduce import reproduces, same_outputs
from .tracing import TraceResult

__all__ = ["ExportCaptureError", "ExportGuard", "dynamic_spec", "export_trace"]


class ExportCaptureError(RuntimeError):
    """``torch.export`` could not capture the model (or its graph does not reproduce it)."""


def _auto(a):
    return {i: torch.export.Dim.AUTO for i in range(a.dim())} if isinstance(a, torch.Tensor) else None


def dynamic_spec(root: nn.Module, args: tuple) -> tuple:
    """``dynamic_shapes`` for exporting ``root`` on the positional ``args``: every dimension of
    every tensor ``Dim.AUTO``, one entry per parameter of ``forward`` the args bind to, as
    ``torch.export`` matches them: the args a ``*args`` parameter takes nested in one tuple.

    >>> class Net(nn.Module):
    ...     def forward(self, x, *rest):
    ...         return x
    >>> spec = dynamic_spec(Net(), (torch.zeros(2), torch.zeros(2, 3), 1))
    >>> len(spec), len(spec[1]), spec[1][1]
    (2, 2, None)
    """
    try:
        signature = inspect.signature(root.forward)
        bound = signature.bind(*args).arguments
    except (TypeError, ValueError):  # no signature, or args it refuses: the export says why
        return tuple(_auto(a) for a in args)
    return tuple(tuple(_auto(a) for a in value) if signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL
                 else _auto(value) for name, value in bound.items())


def _export(root: nn.Module, inputs: tuple, result: TraceResult):
    """Export with every dimension ``Dim.AUTO`` (dynamic unless the forward needs it fixed); a
    batch of one is doubled for the export, since ``torch.export`` fixes dimensions of size 1."""
    def attempt(args):
        dyn = dynamic_spec(root, args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                # torch logs and prints whole graphs when a data-dependent size has no user frame
                # (PyG's int(batch.max())): an attempt whose failure becomes one line of the plan
                with refuse_checkpoint(root), refuse_unrecorded_grad_modes(), \
                        _quiet("torch.fx.experimental.symbolic_shapes"), \
                        contextlib.redirect_stderr(io.StringIO()):
                    return torch.export.export(root, args, strict=False, dynamic_shapes=dyn)
            finally:
                _hold(result, caught)

    doubled = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
                    for a in inputs)
    try:
        return attempt(doubled)
    except Exception:
        if doubled is inputs or all(a is b for a, b in zip(doubled, inputs)):
            raise
        return attempt(inputs)  # the model needs batch 1 (or 1 in its first dimension)


def _build_module(root: nn.Module, egm: fx.GraphModule) -> fx.GraphModule:
    """The exported graph on a :class:`TracedModule` that holds ``root``'s own children, parameters,
    buffers and attributes, plus what the export added (its input-check module, constants)."""
    src = nn.Module()
    src._modules.update(root._modules)
    src._parameters.update(root._parameters)
    src._buffers.update(root._buffers)
    extra = {}
    for node in egm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        try:
            root.get_submodule(target) if node.op == "call_module" else _resolve(root, target)
        except AttributeError:
            if "." in target:
                value = _resolve(egm, target) if node.op == "get_attr" else None
                if not isinstance(value, torch.Tensor):
                    raise ExportCaptureError(f"the exported graph reads {target}, which the model does not hold") from None
                # a constant the export lifted out of a submodule's forward (Swin's attention): kept
                # on the graph module under a flat name, so the user's submodule gains no attribute
                node.target = target = _free_name(root, egm, target.replace(".", "_"))
                extra[target] = src.__dict__[target] = value
                continue
            extra[target] = value = _resolve(egm, target)
            if isinstance(value, nn.Module):
                src._modules[target] = value
            else:
                src.__dict__[target] = value
    gm = _traced_class(getattr(type(root), "_traced_from", type(root)))(src, egm.graph, type(root).__name__)
    _keep_hierarchy(root, gm)
    for name, value in extra.items():
        if isinstance(value, nn.Module):
            gm._modules[name] = value
        else:  # a constant: moves with .to() as torch's own unlifted module's does, but no state_dict key
            gm.register_buffer(name, value, persistent=False)
    _keep_attributes(root.__dict__, gm)
    gm.__dict__["_in_spec"], gm.__dict__["_out_spec"] = egm._in_spec, egm._out_spec
    gm.training = root.training
    # pickling re-traces the generated code with this tracer (torch.export's needs its scope), one
    # that keeps `self.training` a run-time read
    gm.graph._tracer_cls = gm._tracer_cls = _DepthTracer
    return gm


def _free_name(root: nn.Module, egm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2`` ..., whichever neither module holds."""
    candidate, i = name, 0
    while hasattr(root, candidate) or hasattr(egm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _resolve(obj, target: str):
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _kept_state(*modules: nn.Module) -> Iterator[torch.Tensor]:
    """The modules' modes and the random state (yielded) as they were, whatever runs inside."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    rng = torch.random.get_rng_state()
    try:
        yield rng
    finally:
        torch.random.set_rng_state(rng)
        for m, flag in modes:
            m.training = flag


def _matches(root: nn.Module, gm: fx.GraphModule, inputs: tuple, train: bool) -> bool:
    """Does the captured graph compute what the model computes, in train or eval mode
    (passes/reproduce.py)? In eval mode a mismatch means the forward branched on
    ``self.training`` in Python."""
    with _kept_state(root, gm):
        root.train(train)
        gm.train(train)
        return reproduces(root, gm, inputs, {}) is True


_RANDOM = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
           "bernoulli_", "multinomial", "normal", "normal_", "uniform_", "exponential_", "poisson"}


def _op_name(target) -> str:
    """``aten::rand`` / ``torch.rand`` -> ``"rand"``."""
    schema = getattr(target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else getattr(target, "__name__", str(target))


@torch.no_grad()
def _random_only_in_training(root: nn.Module, gm: fx.GraphModule, inputs: tuple) -> bool:
    """Does the graph draw random numbers (beyond dropout, whose mode stays live) where the eval
    forward is deterministic? Then a Python branch on ``self.training`` put them there (DiT's
    class-label dropout: ``if self.training: labels = where(rand(n) < p, null, labels)``), and one
    eval comparison passes whenever that draw happens to change nothing."""
    if not any(n.op == "call_function" and _op_name(n.target) in _RANDOM for n in gm.graph.nodes):
        return False
    with _kept_state(root):
        try:
            root.eval()
            outs = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                outs.append(root(*inputs))
            return same_outputs(*outs)
        except Exception:
            return True


def _bound(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):  # sympy's (and torch's) infinities
        return default


def _dynamic_dims(gm: fx.GraphModule, inputs: tuple, ranges: dict) -> dict[int, dict[int, tuple]]:
    """``{input leaf: {dim: (symbol, low, high)}}`` of the dimensions the export left dynamic."""
    out: dict[int, dict[int, tuple]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat, _ = pytree.tree_flatten((inputs, {}))
    if len(placeholders) != len(flat):
        return out
    for j, (ph, x) in enumerate(zip(placeholders, flat)):
        val = ph.meta.get("val")
        if not isinstance(x, torch.Tensor) or not hasattr(val, "shape"):
            continue
        for i, size in enumerate(val.shape):
            if isinstance(size, int):
                continue
            expr = size.node.expr
            vr = ranges.get(expr)
            low, high = (_bound(vr.lower, 0), _bound(vr.upper, 2 ** 62)) if vr is not None else (0, 2 ** 62)
            out.setdefault(j, {})[i] = (str(expr), low, high)
    return out


def export_trace(root: nn.Module, example_inputs) -> TraceResult:
    """Capture ``root`` (in its current mode: call ``root.train()`` first) with ``torch.export``
    on ``example_inputs`` (a tensor or tuple of positional inputs); see the module docstring.

    Raises :class:`ExportCaptureError` with the first line of what ``torch.export`` said when it
    cannot capture the forward. ``TraceResult.notes`` says when the graph serves training only
    (the eval forward took another Python branch, so eval calls run the module's own forward).

    >>> import torchvision
    >>> r = export_trace(torchvision.models.resnet18(num_classes=10).train(), torch.zeros(2, 3, 32, 32))
    >>> [n.target for n in r.module.graph.nodes if n.op == "call_module"][:3]
    ['conv1', 'bn1', 'relu']
    """
    inputs = input_tuple(example_inputs)
    result = TraceResult(module=root, capture="export")
    try:
        ep = _export(root, inputs, result)
    except Exception as exc:
        raise ExportCaptureError(f"torch.export could not capture {type(root).__name__}: {_first_line(exc)}") from None
    egm = ep.module()
    checks = egm._modules.pop("_guards_fn", None)
    for node in list(egm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            egm.graph.erase_node(node)  # the ExportGuard runs it before the graph, where a misfit can go eager
    gm = _build_module(root, egm)
    _collapse_leaves(gm)
    _live_modes(gm)
    _torch_level(gm)
    gm.graph.lint()
    gm.recompile()
    dynamic = _dynamic_dims(gm, inputs, ep.range_constraints)
    if not _matches(root, gm, inputs, train=True):
        raise ExportCaptureError(f"the graph torch.export captured of {type(root).__name__} does not reproduce its "
                                 "training forward on the example inputs")
    modes = None
    if not _matches(root, gm, inputs, train=False) or _random_only_in_training(root, gm, inputs):
        modes = {name: m.training for name, m in root.named_modules()}
        result.notes.append("the eval forward takes another Python branch than the training one: the graph "
                            "serves training calls; eval calls run the module's own forward")
    gm._call_guard = ExportGuard(type(root).forward, (inputs, {}), dynamic, (n.name for n in gm.graph.nodes), modes,
                                 checks)
    result.module = gm
    result.graphs[""] = gm
    return result
