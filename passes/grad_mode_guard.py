"""Keep gradient-mode switches out of traced graphs.

``with torch.no_grad():`` (or ``torch.enable_grad``, ``torch.set_grad_enabled``,
``torch.inference_mode``, as a block or a decorator) inside a forward traced by ``torch.fx`` runs
once, at trace time, around proxies: the graph holds the ops inside it and nothing of the switch.
The graph then computes the same values but trains a branch the forward does not (its layers get
gradients), or stops training one it does; a check in ``no_grad`` cannot see it. While
:func:`refuse_grad_modes` is active, such a switch raises :class:`GradModeInGraph`; the tracer
then makes the calling module a leaf that runs its own forward (a fallback, reported with this
reason), which keeps the switch.

``torch.export`` records ``no_grad`` and ``set_grad_enabled(False)`` in its graph, but not a switch
that turns gradients on (a no-op while it exports, with gradients on) nor ``inference_mode``:
:func:`refuse_unrecorded_grad_modes` refuses those while exporting.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch

__all__ = ["GradModeInGraph", "refuse_grad_modes", "refuse_unrecorded_grad_modes"]


class GradModeInGraph(RuntimeError):
    """Raised while tracing by a switch of the gradient mode."""


_WHY = ("switches the gradient mode (torch.no_grad / enable_grad / set_grad_enabled / inference_mode), which a "
        "traced graph would drop: this module runs its own forward")


@contextlib.contextmanager
def refuse_grad_modes(active: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """While inside, a switch of the gradient mode raises :class:`GradModeInGraph` whenever
    ``active()`` holds (a tracer says False while it runs real modules on example values).

    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         with torch.no_grad():
    ...             return self.lin(x)
    >>> with refuse_grad_modes():
    ...     torch.fx.symbolic_trace(Net())
    Traceback (most recent call last):
    ...
    passes.grad_mode_guard.GradModeInGraph: switches the gradient mode (torch.no_grad / enable_grad / set_grad_enabled / inference_mode), which a traced graph would drop: this module runs its own forward
    >>> "no_grad" in torch.fx.symbolic_trace(Net()).code  # outside: traced through, the switch gone
    False
    """
    # every Python-level switch goes through torch._C._set_grad_enabled (no_grad, enable_grad,
    # set_grad_enabled) or inference_mode.__enter__, both looked up at call time
    set_enabled = torch._C._set_grad_enabled
    inference_enter = torch.autograd.grad_mode.inference_mode.__enter__

    def refused_set(mode):
        if active():
            raise GradModeInGraph(_WHY)
        return set_enabled(mode)

    def refused_inference(self):
        if active():
            raise GradModeInGraph(_WHY)
        return inference_enter(self)
    torch._C._set_grad_enabled = refused_set
    torch.autograd.grad_mode.inference_mode.__enter__ = refused_inference
    try:
        yield
    finally:
        torch._C._set_grad_enabled = set_enabled
        torch.autograd.grad_mode.inference_mode.__enter__ = inference_enter


_EXPORT_WHY = ("switches gradients on (torch.enable_grad / set_grad_enabled(True)) or enters torch.inference_mode, "
               "which an exported graph would drop")


def _torch_calls() -> bool:
    """Whether torch's own code (torch.export turning gradients on around its trace), not the
    model's, made the switch: the caller two frames up, past a decorator's wrapper."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == "torch.utils._contextlib":
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name == "torch" or name.startswith("torch.")


@contextlib.contextmanager
def refuse_unrecorded_grad_modes() -> Iterator[None]:
    """While inside, ``torch.enable_grad()``, ``torch.set_grad_enabled(True)`` and
    ``torch.inference_mode()`` raise :class:`GradModeInGraph`: the switches ``torch.export``
    leaves out of its graph.

    >>> with refuse_unrecorded_grad_modes():
    ...     with torch.no_grad():
    ...         pass
    ...     torch.enable_grad().__enter__()
    Traceback (most recent call last):
    ...
    passes.grad_mode_guard.GradModeInGraph: switches gradients on (torch.enable_grad / set_grad_enabled(True)) or enters torch.inference_mode, which an exported graph would drop
    """
    mode = torch.autograd.grad_mode
    saved = [(mode.enable_grad, "__enter__"), (mode.set_grad_enabled, "__init__"), (mode.set_grad_enabled, "__enter__"),
             (mode.inference_mode, "__enter__")]
    saved = [(cls, name, cls.__dict__[name]) for cls, name in saved]

    def refusing(cls, original):
        def method(self, *args, **kwargs):
            on = args[0] if args else kwargs.get("mode", getattr(self, "mode", True))
            if (cls is mode.inference_mode or bool(on)) and not _torch_calls():
                raise GradModeInGraph(_EXPORT_WHY)
            return original(self, *args, **kwargs)
        return method
    for cls, name, original in saved:
        setattr(cls, name, refusing(cls, original))
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)
