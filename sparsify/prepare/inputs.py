"""Example inputs: guessing one from the model, and what one forward on them shows (the output
positions per sample of every Conv/Linear layer, i.e. MACs per weight element)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch
from torch import nn

from passes.call_inputs import input_tuple, whole_dict_note
from sparsify.core.conv1d import CONV_TRANSPOSE_TYPES, in_features_of, out_features_of
from sparsify.core.eval_loop import internal, run_eval, samples_in
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.modes import kept_modes
from sparsify.core.state import SparsifyState

__all__ = ["positions_per_sample", "guess_shape", "guess_example_inputs", "state_inputs", "check_inputs", "describe_inputs",
           "misfit_error", "refuse_misfit", "refuse_empty", "FIT_HINT"]

#: what to do about example inputs a forward rejects
FIT_HINT = ("pass what the model's forward takes, batch first (e.g. example_inputs=(torch.zeros(1, 3, 224, 224),) "
            "for an image model)")


@torch.no_grad()
def positions_per_sample(model: nn.Module, example_inputs: Sequence) -> dict[str, float]:
    """Run ``model`` once in eval mode and return, for each Conv/Linear layer by qualified name,
    its output positions per sample (MACs per sample = positions × weight elements; a
    ConvTranspose's input positions, each of which meets every weight element).

    >>> positions_per_sample(nn.Sequential(nn.Conv2d(3, 8, 3)), (torch.zeros(2, 3, 10, 10),))
    {'0': 64.0}
    """
    batch = samples_in(example_inputs)
    out: dict[str, float] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, CONV_TRANSPOSE_TYPES):
            # every input position meets every weight element (padding crops the output only)
            def hook(m, inp, y, name=name, in_ch=mod.in_channels):
                out[name] = out.get(name, 0.0) + inp[0].numel() / in_ch / batch
            handles.append(mod.register_forward_hook(hook))
        elif isinstance(mod, WEIGHT_TYPES):
            out_ch = out_features_of(mod)

            def hook(m, inp, y, name=name, out_ch=out_ch):
                out[name] = out.get(name, 0.0) + y.numel() / out_ch / batch
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():  # only shapes are read: an autograd graph would cost time and memory
        run_eval(model, [example_inputs], tuple, None, handles)
    return out


def guess_shape(model: nn.Module) -> tuple | None:
    """The shape :func:`guess_example_inputs` tries, from the first Conv/Linear layer; None without one.

    >>> guess_shape(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    (1, 3, 224, 224)
    """
    first = _first_layer(model)
    return None if first is None else _shape_for(first)


def _first_layer(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, WEIGHT_TYPES)), None)


def _shape_for(first: nn.Module) -> tuple:
    if isinstance(first, CONV_TRANSPOSE_TYPES):  # a decoder or generator: a small feature map
        return (1, first.in_channels, *([8] * (first.weight.dim() - 2)))
    if isinstance(first, nn.Conv2d):
        return (1, first.in_channels, 224, 224)
    if isinstance(first, nn.Conv3d):
        return (1, first.in_channels, 8, 112, 112)
    if isinstance(first, nn.Conv1d):
        return (1, first.in_channels, 128)
    return (1, in_features_of(first))


def guess_example_inputs(model: nn.Module) -> tuple | None:
    """A plausible single-sample input from the first Conv/Linear layer (224² images, 112² video
    clips of 8 frames, 128-long sequences), or None when the model rejects it."""
    first = _first_layer(model)
    if first is None:
        return None
    x = (torch.zeros(_shape_for(first), device=first.weight.device, dtype=first.weight.dtype),)
    try:
        # internal: the guess's zeros are no evaluation of the user's (activation counts ignore it)
        with torch.no_grad(), kept_modes(model, training=False), internal():
            model(*x)
        return x
    except Exception:
        return None


def state_inputs(state: SparsifyState, root: nn.Module):
    """The example inputs given to ``sparsify`` or, when none were, a single sample guessed from
    the model (:func:`sparsify.prepare.inputs.guess_example_inputs`) on first use; ``None`` when the
    model rejects the guess. Stored in ``state.example_inputs``."""
    if state.example_inputs is None and state.guess_inputs_later:
        state.guess_inputs_later = False
        state.example_inputs = guess_example_inputs(root)
    return state.example_inputs


def describe_inputs(inputs) -> str:
    """One call's positional ``inputs`` for an error message: shapes and dtypes.

    >>> describe_inputs((torch.zeros(2, 5), {"ids": torch.zeros(2, dtype=torch.long)}, [torch.zeros(3)], None))
    '(2, 5) float32, {ids: (2,) int64}, [(3,) float32], NoneType'
    """
    def one(x):
        if isinstance(x, torch.Tensor):
            return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        if isinstance(x, Mapping):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in list(x.items())[:6]) + (", ...}" if len(x) > 6 else "}")
        if isinstance(x, (list, tuple)) and x:
            return "[" + ", ".join(one(v) for v in x[:3]) + (", ...]" if len(x) > 3 else "]")
        return type(x).__name__
    return ", ".join(one(x) for x in inputs)


def misfit_error(what: str, model: nn.Module, inputs: tuple, error: Exception, hint: str) -> ValueError:
    """The one-line error for ``inputs`` (``what``: the argument that gave them) on which the
    model's first forward raised ``error``: their shapes and dtypes, the error's first line, ``hint``."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return ValueError(f"{what} do not fit the model: shapes {describe_inputs(inputs)}{whole_dict_note(model, inputs)} "
                      f"raise {type(error).__name__}: {first}; {hint}")



def refuse_misfit(what: str, model: nn.Module, inputs: tuple, error: Exception) -> None:
    """:func:`misfit_error` when ``inputs`` do not fit ``model`` (``error`` came from a step that
    ran it, such as finalize's acceleration without the output check); nothing when they fit (the
    error was something else, for the caller to raise).

    >>> refuse_misfit("finalize: example_inputs", nn.Linear(2, 2), (torch.zeros(1, 2),), RuntimeError("x"))
    """
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:
        raise misfit_error(what, model, inputs, error, FIT_HINT) from None

def refuse_empty(inputs: tuple, what: str, why: str = "") -> None:
    """A one-line error when one call's ``inputs`` (``what`` gave them) hold no sample; ``why``
    says what an empty batch would break.

    >>> refuse_empty((torch.zeros(0, 4),), "finalize: example_inputs", "the check would compare nothing; ")
    Traceback (most recent call last):
    ValueError: finalize: example_inputs hold 0 samples (shapes (0, 4) float32): the check would compare nothing; pass at least one, batch first
    """
    if samples_in(inputs) == 0:
        raise ValueError(f"{what} hold 0 samples (shapes {describe_inputs(inputs)}): {why}pass at least one, "
                         "batch first")


def check_inputs(model: nn.Module, example_inputs) -> dict[str, float] | None:
    """Say now, in one line, what would otherwise fail later (in ``finalize`` or a MAC count): a
    TorchScript model, or ``example_inputs`` the model cannot run on (or that hold no sample). The
    one eval forward that checks them also measures :func:`positions_per_sample`, returned for the
    MAC counts (so a later ``report`` needs no forward of its own); ``None`` without example inputs.

    >>> check_inputs(nn.Linear(4, 2), (torch.zeros(1, 3),))
    Traceback (most recent call last):
    ValueError: example_inputs do not fit the model: shapes (1, 3) float32 raise RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x2); pass what the model's forward takes, batch first (e.g. example_inputs=(torch.zeros(1, 3, 224, 224),) for an image model)
    >>> check_inputs(nn.Linear(4, 2), (torch.zeros(1, 4),))
    {'': 1.0}
    >>> check_inputs(nn.Linear(4, 2), (torch.zeros(0, 4),))
    Traceback (most recent call last):
    ValueError: example_inputs hold 0 samples (shapes (0, 4) float32): pass at least one, batch first
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("sparsify takes a Python nn.Module, not a TorchScript module (torch.jit.script/trace "
                        "output cannot be traced by torch.fx): sparsify the original module, then script the "
                        "result of sparsify.finalize")
    if example_inputs is None:
        return None
    inputs = input_tuple(example_inputs)
    refuse_empty(inputs, "example_inputs")  # MACs per sample would divide by it
    try:
        return positions_per_sample(model, inputs)
    except Exception as e:
        raise misfit_error("example_inputs", model, inputs, e, FIT_HINT) from None
