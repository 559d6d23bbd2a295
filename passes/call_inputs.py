"""Example inputs as one call's positional arguments: a list or tuple is the arguments, one tensor
the only one, and keyword arguments (a dict, a tokenizer's ``BatchEncoding``) are bound to
``forward``'s parameters by name, with one-line errors for keys that name none (which a
``**kwargs`` cannot take either: the library's calls are positional)."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["input_tuple", "positional_inputs", "whole_dict_note"]


def input_tuple(example_inputs) -> tuple:
    """``example_inputs`` as the positional arguments of one call: a list or tuple is the
    arguments, anything else (one tensor) the only one.

    >>> input_tuple(torch.zeros(1)).__len__(), input_tuple([1, 2])
    (1, (1, 2))
    """
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)


def positional_inputs(module: nn.Module, example_inputs, what: str = "example_inputs"):
    """``example_inputs`` given as keyword arguments (a dict, or a tokenizer's ``BatchEncoding``)
    as the positional arguments of the same call of ``module``: the named ones in the place of
    ``forward``'s parameters, those left out before the last named one at their defaults. A dict
    none of whose keys names a parameter is the one argument of a forward that may take a dict
    (sentence-transformers' ``forward(features)``) and is returned as it is, like other inputs;
    where forward cannot take one (its first parameter is annotated as a tensor, or it needs
    several), the keys are refused. ``what`` names the argument in error messages.

    >>> class Net(nn.Module):
    ...     def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
    ...         return input_ids
    >>> positional_inputs(Net(), {"labels": 1, "input_ids": 2})
    (2, None, None, 1)
    >>> positional_inputs(Net(), {"input_ids": 2, "pixel_values": 1})
    Traceback (most recent call last):
    ValueError: example_inputs: Net.forward has no parameter 'pixel_values' (it takes input_ids, attention_mask, token_type_ids, labels)
    >>> class Extra(nn.Module):
    ...     def forward(self, x, **kwargs):
    ...         return x
    >>> positional_inputs(Extra(), {"x": 1, "scale": 2})
    Traceback (most recent call last):
    ValueError: example_inputs: Extra.forward has no parameter 'scale' (it takes x), and its **kwargs cannot get it from example inputs, which are bound to positional parameters: give forward a parameter for it or leave it out
    >>> positional_inputs(Net(), {"features": 1})
    {'features': 1}
    >>> class Image(nn.Module):
    ...     def forward(self, x: torch.Tensor):
    ...         return x
    >>> positional_inputs(Image(), {"pixel_values": 1})
    Traceback (most recent call last):
    ValueError: example_inputs: Image.forward has no parameter 'pixel_values' (it takes x)
    """
    if not isinstance(example_inputs, Mapping):
        return example_inputs
    owner, params = _forward_parameters(module, what)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    takes = ", ".join(names) or "no positional parameters"
    bound = [k for k in example_inputs if k in names]
    kwonly = [k for k in example_inputs if any(p.name == k and p.kind == p.KEYWORD_ONLY for p in params)]
    if kwonly:
        # every call the library makes (capture, MAC count, finalize's check) is positional
        raise ValueError(f"{what}: {owner}.forward takes {kwonly[0]!r} by keyword only, which "
                         f"{what.rpartition(': ')[2].replace('_', ' ')} cannot pass "
                         "(they are bound to positional parameters): " +
                         ("leave it out" if bound else "give forward a positional parameter for it"))
    if not example_inputs:
        raise ValueError(f"{what}: an empty dict names no argument of {owner}.forward (it takes {takes})")
    unknown = [k for k in example_inputs if k not in names]
    if not bound and _may_take_dict(params, positional):
        return example_inputs
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise ValueError(f"{what}: {owner}.forward has no parameter{'s' if len(unknown) > 1 else ''} {keys} "
                         f"(it takes {takes})" + _kwargs_note(what, params, len(unknown)))
    last = max((names.index(k) for k in example_inputs), default=-1)
    args = []
    for p in positional[:last + 1]:
        if p.name in example_inputs:
            args.append(example_inputs[p.name])
        elif p.default is not p.empty:
            args.append(p.default)
        else:
            raise ValueError(f"{what}: {owner}.forward needs {p.name!r}, which they leave out")
    return tuple(args)


def _kwargs_note(what: str, params: list, count: int) -> str:
    """Why a forward's ``**kwargs`` does not take the ``count`` keys that name no parameter (every
    call the library makes, capture, MAC count, finalize's check, is positional), and the fix."""
    var = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
    if var is None:
        return ""
    them = "it" if count == 1 else "them"
    return (f", and its **{var} cannot get {them} from {what.rpartition(': ')[2].replace('_', ' ')}, which are "
            f"bound to positional parameters: give forward a parameter for {them} or leave {them} out")


def whole_dict_note(module: nn.Module, inputs) -> str:
    """For an error message about ``inputs`` (one call's positional arguments): what
    :func:`positional_inputs` did with a dict none of whose keys names a parameter (passed it
    whole as forward's first argument); ``""`` for other inputs.

    >>> whole_dict_note(nn.Sequential(), ({"pixel_values": 1},))
    ' (a dict whose keys pixel_values name no parameter of Sequential.forward, which takes input: passed whole as its first argument)'
    """
    if len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        return ""
    try:
        owner, params = _forward_parameters(module, "")
    except ValueError:
        return ""
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(k in names for k in inputs[0]):
        return ""
    return (f" (a dict whose keys {', '.join(map(str, inputs[0]))} name no parameter of {owner}.forward, which "
            f"takes {', '.join(names) or 'no positional parameters'}: passed whole as its first argument)")


def _forward_parameters(module: nn.Module, what: str):
    """``(class name, forward's parameters)``; PEFT's ``PeftModel.forward(*args, **kwargs)`` hands
    every argument to its base model, whose parameters count then."""
    fn = module.forward
    cls = getattr(type(module), "_traced_from", None) or type(module)
    owner = cls.__name__ if cls.__name__ != "GraphModuleImpl" else cls.__mro__[1].__name__
    try:
        params = list(inspect.signature(fn).parameters.values())
        if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) and \
                callable(getattr(module, "get_base_model", None)):
            base = module.get_base_model()
            fn, owner = base.forward, type(base).__name__
            params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ValueError(f"{what}: the parameters of {owner}.forward cannot be read; pass the inputs "
                         "as a tuple in the order forward takes them") from None
    return owner, params


def _may_take_dict(params: list, positional: list) -> bool:
    """Can a dict be forward's one argument? Not where forward has no positional parameter,
    needs several, or annotates the first as a tensor (torchvision's ``x: Tensor``, transformers'
    ``input_ids: torch.Tensor | None``): unannotated ones may (sentence-transformers' ``features``)."""
    if not positional:
        return any(p.kind == p.VAR_POSITIONAL for p in params)
    if sum(p.default is p.empty for p in positional) > 1:
        return False
    note = positional[0].annotation
    text = "" if note is inspect.Parameter.empty else str(note)
    return not ("Tensor" in text and not any(w in text for w in ("dict", "Dict", "Mapping", "Any")))
