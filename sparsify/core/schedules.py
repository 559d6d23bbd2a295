"""Schedules over optimizer steps (never epochs or forward calls).

Times in a recipe are either whole step counts or fractions in (0, 1) of ``total_steps``. A
float of 1 or more counts steps only when it is whole (``500.0``), and never as ``1.0``, which
reads as "the whole run": both are refused rather than guessed (docs/recipes.md).
"""
from __future__ import annotations

import math
import numbers

import torch

from sparsify.core.errors import RecipeError

__all__ = ["resolve_time", "cubic", "polynomial", "ScheduleError", "plain_number"]


class ScheduleError(RecipeError):
    """A schedule time could not be resolved (e.g. a fraction without ``total_steps``): a
    :class:`~sparsify.core.errors.RecipeError` (a ``ValueError``), whose message starts with the
    recipe's source where a recipe's time caused it.

    >>> import torch, sparsify
    >>> try:
    ...     sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(2, 2)), "st3")   # times: fractions of the run
    ... except sparsify.ScheduleError as e:
    ...     print(str(e)[:85])
    built-in:st3: $.rules[0].params.begin=0.05 is a fraction of the training length: pass
    """


def plain_number(value):
    """``value`` as a Python ``int`` / ``float`` when it is a number of another kind (numpy's
    ``int64`` / ``float32``, a 0-dim torch tensor), so that every check and the JSON a recipe is
    stored as see one kind; lists and tuples item by item; anything else (bools included) as it is.

    >>> import numpy as np, torch
    >>> plain_number(np.int64(10)), plain_number(torch.tensor(0.5)), plain_number([np.float32(0.25)])
    (10, 0.5, [0.25])
    """
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(plain_number(v) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def resolve_time(value, total_steps: int | None, *, what: str = "time") -> int:
    """Turn a recipe time into a step index.

    Integers (and whole floats > 1) are steps; a float in (0, 1) is a fraction of
    ``total_steps``; 0 is step 0. A float such as 1.5 (neither) and ``1.0`` (step 1, though it
    reads as the whole run) are refused.

    >>> resolve_time(0.5, 1000), resolve_time(20, None), resolve_time(2000.0, None)
    (500, 20, 2000)
    >>> resolve_time(1.0, 1000, what="end")
    Traceback (most recent call last):
    ...
    sparsify.core.schedules.ScheduleError: end=1.0 would be step 1, not the whole run: a float of 1 or more counts steps and fractions of the run are below 1; write the run's last step as an integer (end=N with total_steps=N), or 1 for step 1
    """
    if value is None:
        return None
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            isinstance(value, float) and math.isnan(value)):
        raise ScheduleError(f"{what} must be a step count >= 0 or a fraction in (0, 1), got {value!r}")
    if value >= 2 ** 62:  # (a step count a run could reach and a tensor can hold)
        raise ScheduleError(f"{what} must be a step count below 2**62, got {value!r}" if isinstance(value, float)
                            else f"{what} must be a step count below 2**62, got an integer of {value.bit_length()} bits")
    if isinstance(value, float) and value == 1:  # it was step 1, silently: a ramp done after one step
        raise ScheduleError(f"{what}=1.0 would be step 1, not the whole run: a float of 1 or more counts steps and "
                            f"fractions of the run are below 1; write the run's last step as an integer "
                            f"({what.rsplit('.', 1)[-1]}=N with total_steps=N), or 1 for step 1")
    if isinstance(value, float) and value > 1 and not value.is_integer():  # was truncated silently
        raise ScheduleError(f"{what}={value} is neither a step count (a whole number) nor a fraction of the run "
                            f"(below 1): give the step as an integer ({round(value)}) or a fraction in (0, 1)")
    if isinstance(value, float) and 0 < value < 1:
        if total_steps is None:
            raise ScheduleError(
                f"{what}={value} is a fraction of the training length: pass total_steps=N to "
                "sparsify(...) (N = number of optimizer steps), or give the time in steps")
        return int(round(value * total_steps))
    return int(value)


def cubic(t: int, begin: int, end: int, final: float) -> float:
    """Zhu & Gupta cubic ramp: ``final * (1 - (1 - (t-begin)/(end-begin))**3)``.

    0 before ``begin``, ``final`` from ``end`` on.

    >>> round(cubic(50, 0, 100, 0.8), 6)
    0.7
    """
    return polynomial(t, begin, end, final, power=3)


def polynomial(t: int, begin: int, end: int, final: float, power: float = 3) -> float:
    """``final * (1 - (1 - p)**power)`` with ``p = (t-begin)/(end-begin)`` clipped to [0, 1].

    >>> round(polynomial(5, 0, 10, 0.2, power=2), 6)
    0.15
    """
    if t < begin:
        return 0.0
    if t >= end:
        return float(final)
    p = (t - begin) / (end - begin)
    return float(final) * (1.0 - (1.0 - p) ** power)
