"""What a function that takes a sparsified model says when given something else: a non-module (an
optimizer, ``model.parameters()``), the model ``sparsify()`` was given, a layer of the one it
returned, or a plain model. Only wording: :func:`sparsify.core.state.find_state` decides."""
from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from sparsify.core.layers import SparseWeightMixin

__all__ = ["check_module", "given_to_sparsify", "not_sparsified", "remember_sparsified"]


# what sparsify() was given and what it returned, weakly, by id (a model class may define __eq__
# without __hash__): only to word find_state's errors
_GIVEN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_RETURNED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def remember_sparsified(given: nn.Module, returned: nn.Module) -> None:
    """Note a ``sparsify()`` call, so that passing its input, or a part of its output, to the other
    functions is named as such."""
    if given is not returned:
        _GIVEN[id(given)] = given
    _RETURNED[id(returned)] = returned


def given_to_sparsify(module: nn.Module) -> bool:
    """Whether ``module`` was given to a ``sparsify()`` that returned another module."""
    return _GIVEN.get(id(module)) is module


def not_sparsified(root: nn.Module, where: str, what: str) -> str:
    """Why ``root``, which holds no state, is not what ``where`` takes, as well as can be told."""
    if given_to_sparsify(root):
        return (f"{where}: {what} is the model given to sparsify.sparsify, which returns a new module: pass the one it "
                "returned (model = sparsify.sparsify(model, ...))")
    # the library's own classes live only inside a sparsified model: a part of one was passed
    if isinstance(root, SparseWeightMixin) or type(root).__module__.split(".")[0] == "sparsify" or \
            any(m is root for r in list(_RETURNED.values()) for m in r.modules()):
        return (f"{where}: {what} is a layer inside a sparsified model ({type(root).__name__}), not the model: pass "
                "the model sparsify.sparsify returned")
    # finalize leaves no mark on its output: it can only be named as a possibility
    return (f"{where}: {'this model' if what == 'model' else what} was not made by sparsify.sparsify(...), or it is "
            "sparsify.finalize's output (plain modules: nothing to step, report or sync); call "
            "model = sparsify.sparsify(model, recipe) first")


def _given(value) -> str:
    """What a wrong argument is, for an error message, with what was probably meant."""
    if isinstance(value, torch.optim.Optimizer):
        return f"{type(value).__name__} (an optimizer: pass the model it trains)"
    if isinstance(value, types.GeneratorType) or \
            (isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor)):
        return f"{type(value).__name__} (model.parameters()? pass the model itself)"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], nn.Module):
        return f"{type(value).__name__} of modules (pass one model at a time)"
    return "None" if value is None else type(value).__name__


def check_module(value, where: str = "sparsify", what: str = "model") -> None:
    """Refuse anything but a module, naming the function (``where``) and the argument (``what``).

    >>> check_module(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), "sparsify.step")
    Traceback (most recent call last):
    ...
    TypeError: sparsify.step: model must be the nn.Module sparsify.sparsify returned, got SGD (an optimizer: ...)
    """
    if not isinstance(value, nn.Module):
        raise TypeError(f"{where}: {what} must be the nn.Module sparsify.sparsify returned, got {_given(value)}")
