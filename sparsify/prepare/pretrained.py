"""``save_pretrained`` of a model in sparse training (transformers, diffusers, peft models).

Such a folder holds what the class saves: the raw weights, with the masks and thresholds as
extra entries. ``from_pretrained`` into the plain class drops the extra entries (transformers
lists them as "UNEXPECTED ... can be ignored") and gives the dense weights: the sparsity is gone,
silently. The finalized model is the one to save for serving; the sparsified one's folder is a
training checkpoint. A sparsified model with a ``save_pretrained`` method therefore says so, once,
when it is called outside a running ``Trainer`` (whose checkpoints are resumed into a sparsified
model: ``SparsifyTrainerCallback`` marks the run, see :attr:`SparsifyState.in_trainer`).

A finalized model saves as its class does, unless it holds modules the class does not build (SAS's
wider layers, semi-structured's masks: a method's ``deploy_layout``; for a method that declares
none, the modules it keeps that are not plain Conv/Linear layers: :func:`kept_layout`):
``from_pretrained`` could not restore them, and :func:`guard_foreign_layout` makes its
``save_pretrained`` say so, once.
"""
from __future__ import annotations

import types
import warnings

from torch import nn

from sparsify.core.contract import Method
from sparsify.core.layers import WEIGHT_TYPES, SparseWeightMixin
from sparsify.core.registry import get_method
from sparsify.core.state import find_state

__all__ = ["guard_save_pretrained", "unguard_save_pretrained", "guard_foreign_layout", "kept_layout"]

RESUME_ADVICE = ("to resume training, build the model with the same sparsify(...) call and load_state_dict the "
                 "folder's weights (strict=False where a tied head's weight was left out: "
                 "docs/transformers.md#saving)")


def save_advice(cls_name: str, wide: list[str]) -> str:
    """What ``save_pretrained`` of a model in sparse training writes, and what to save instead;
    ``wide``: the methods' ``training_layout``s (weights of other shapes than the class's)."""
    if not wide:
        return ("save_pretrained of a model in sparse training writes a training checkpoint (raw weights; masks "
                "and thresholds as extra entries): from_pretrained of it into the plain class drops those entries "
                "and gives the DENSE model. For a model to serve, save the finalized one: "
                "sparsify.finalize(model).save_pretrained(path); " + RESUME_ADVICE)
    return (f"save_pretrained of a model in sparse training writes a training checkpoint holding {' and '.join(wide)}, "
            f"which {cls_name} does not build: from_pretrained of it into the plain class refuses those weights. "
            "For a model to serve, finalize it and serve it through torch.export (docs/deployment.md#serving-"
            "without-fx-sparsify); " + RESUME_ADVICE)


def save_pretrained(self, *args, **kwargs):
    """The class's ``save_pretrained``, with the warning of the module docstring (or, for a
    finalized model, :func:`guard_foreign_layout`'s)."""
    state = find_state(self, required=False)
    if state is not None and not state.in_trainer and "save_pretrained" not in state.warned:
        state.warned.add("save_pretrained")
        wide = sorted({get_method(g.method_name).training_layout for g in state.groups.values()} - {None})
        warnings.warn("sparsify: " + save_advice(type(self).__name__, wide), stacklevel=2)
    why = self.__dict__.pop("_sparsify_foreign_layout", None)  # said once
    if why:
        warnings.warn(f"sparsify: this finalized model holds {why}, which {type(self).__name__} does not build: "
                      "from_pretrained of the folder save_pretrained writes does not give this model back. Serve it "
                      "through torch.export, or torch.save(model) where fx-sparsify is installed "
                      "(docs/deployment.md#serving-without-fx-sparsify)",
                      stacklevel=2)
    return type(self).save_pretrained(self, *args, **kwargs)


def guard_save_pretrained(root: nn.Module) -> None:
    """Route ``root.save_pretrained`` (when its class has one) through :func:`save_pretrained`:
    an instance attribute, so that the model's class is left as it is.

    >>> import torch
    >>> class Pretrained(torch.nn.Linear):
    ...     def save_pretrained(self, path): return path
    >>> m = Pretrained(2, 2)
    >>> guard_save_pretrained(m)
    >>> m.save_pretrained("out")  # no sparsify state: nothing to say
    'out'
    """
    if callable(getattr(type(root), "save_pretrained", None)):
        root.__dict__["save_pretrained"] = types.MethodType(save_pretrained, root)


def unguard_save_pretrained(root: nn.Module) -> None:
    """Undo :func:`guard_save_pretrained` (``finalize``'s plain model saves as its class does)."""
    method = root.__dict__.get("save_pretrained")
    if isinstance(method, types.MethodType) and method.__func__ is save_pretrained:
        del root.__dict__["save_pretrained"]


def kept_layout(method: Method, kept: list[nn.Module]) -> str | None:
    """What ``kept``, the modules ``method``'s ``finalize_member`` put in the finalized model, hold
    that the model's class does not build: the method's ``deploy_layout`` (``""``: nothing) or,
    where it declares none (``None``, a method of the user's that keeps a module of its own), its
    kept modules that are not plain Conv/Linear layers; None when there is nothing to say.

    >>> import torch
    >>> class Gate(Method):
    ...     name = "gate"
    >>> kept_layout(Gate(), [torch.nn.Linear(2, 2), torch.nn.Hardtanh()])
    "modules of method 'gate' that its finalize_member keeps (Hardtanh; the method declares no deploy_layout)"
    >>> kept_layout(Gate(), [torch.nn.Linear(2, 2)]) is None
    True
    """
    if not kept:
        return None
    if method.deploy_layout is not None:
        return method.deploy_layout or None
    own = sorted({type(m).__name__ for m in kept if isinstance(m, SparseWeightMixin) or not isinstance(m, WEIGHT_TYPES)})
    if not own:
        return None
    return (f"modules of method {method.name!r} that its finalize_member keeps ({', '.join(own)}; the method declares "
            "no deploy_layout)")


def guard_foreign_layout(root: nn.Module, why: str) -> None:
    """Warn at ``root.save_pretrained`` (when its class has one) that the finalized ``root``
    holds ``why``: modules its class does not build, which ``from_pretrained`` cannot restore.

    >>> import torch
    >>> class Pretrained(torch.nn.Linear):
    ...     def save_pretrained(self, path): return path
    >>> m = Pretrained(2, 2)
    >>> guard_foreign_layout(m, "a mask")
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as said:
    ...     warnings.simplefilter("always")
    ...     m.save_pretrained("out"), m.save_pretrained("out")
    ('out', 'out')
    >>> len(said), str(said[0].message)[:49]
    (1, 'sparsify: this finalized model holds a mask, whic')
    """
    if callable(getattr(type(root), "save_pretrained", None)):
        root.__dict__["_sparsify_foreign_layout"] = why
        guard_save_pretrained(root)
