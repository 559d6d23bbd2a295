"""The check of :func:`sparsify.finalize`'s options, which ``sparsify.finalize`` runs before any
work so that a mistyped option fails in one line naming it. Kept out of finalize.py: it reads
the options only, never the model (``sparsify.deploy.finalize`` re-exports it)."""
from __future__ import annotations

import inspect
import math
import numbers

import torch

__all__ = ["check_options"]


def check_options(check, rtol, atol, accelerate, semi_structured) -> None:
    """One-line errors for :func:`sparsify.finalize`'s options: a string or number where a flag
    goes would count as true, and a negative or NaN tolerance fails inside ``torch.allclose``.

    >>> check_options("no", 1e-4, 1e-5, False, False)
    Traceback (most recent call last):
    TypeError: finalize: check is True or False; got 'no'
    >>> check_options(True, -1, 1e-5, False, False)
    Traceback (most recent call last):
    ValueError: finalize: rtol is a tolerance, a finite number >= 0; got -1
    """
    if not isinstance(check, bool):
        raise TypeError(f"finalize: check is True or False; got {check!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"finalize: {name} is a tolerance, a finite number >= 0; got {type(value).__name__} "
                            f"{value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"finalize: {name} is a tolerance, a finite number >= 0; got {value!r}")
    if not isinstance(accelerate, (bool, dict)):
        raise TypeError(f"finalize: accelerate is True, False or a dict of options for "
                        f"sparsify.deploy.accelerate.accelerate; got {type(accelerate).__name__} {accelerate!r}")
    if isinstance(accelerate, dict):
        from sparsify.deploy.accelerate import accelerate as fn
        takes = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
        if unknown := [k for k in accelerate if k not in takes]:
            raise TypeError(f"finalize: accelerate has no option {unknown[0]!r} (a dict of options for "
                            f"sparsify.deploy.accelerate.accelerate, which takes {', '.join(takes)})")
    if not isinstance(semi_structured, (bool, torch.dtype)):
        raise TypeError(f"finalize: semi_structured is True, False or a torch.dtype (torch.float16, "
                        f"torch.bfloat16); got {type(semi_structured).__name__} {semi_structured!r}")
