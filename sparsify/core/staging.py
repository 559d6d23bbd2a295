"""When a method is active: its own ``begin``/``end`` params, or a named stage of the recipe.

Staged recipes (``dual``) give a ``stages`` block of named step ranges; a rule joins one with
``params.stage``. Groups use :func:`active_range` to turn that into steps and
:func:`stage_at` to say which recipe stage is running (the report shows it).
"""
from __future__ import annotations

from sparsify.core.schedules import ScheduleError
from sparsify.core.contract import GroupContext

__all__ = ["active_range", "resolve_stages", "stage_at", "in_range"]


def active_range(params: dict, ctx: GroupContext, method: str) -> tuple[int, int | None]:
    """``(begin, end)`` steps of a rule: its stage's range when ``params["stage"]`` is set,
    else its ``begin`` / ``end`` params (``end`` None: never ends).

    >>> from torch import nn
    >>> ctx = GroupContext(nn.Identity(), 100, stages=[{"name": "b", "begin": 0.5, "end": None}])
    >>> active_range({"stage": "b"}, ctx, "tl1")
    (50, None)
    """
    stage = params.get("stage")
    if stage is not None:
        try:
            return ctx.stage(stage)
        except ScheduleError:
            raise
        except ValueError as e:
            raise ValueError(f"{method}: params.stage: {e}") from None
    begin = ctx.time(params.get("begin", 0), f"{method}: begin") or 0
    end = ctx.time(params.get("end"), f"{method}: end")
    if end is not None and end < begin:
        raise ValueError(f"{method}: end ({end}) is before begin ({begin})")
    return begin, end


def in_range(step: int, begin: int, end: int | None) -> bool:
    """``begin <= step < end`` (``end`` None: open-ended)."""
    return step >= begin and (end is None or step < end)


def resolve_stages(ctx: GroupContext) -> list[tuple[str, int, int | None]]:
    """The recipe's stages as ``(name, begin step, end step or None)``: plain data a group can keep
    (a group holding ``ctx`` would hold the model root, and a model that references itself cannot
    be pickled).

    >>> from torch import nn
    >>> resolve_stages(GroupContext(nn.Identity(), 100, stages=[{"name": "a", "begin": 0, "end": 0.5}]))
    [('a', 0, 50)]
    """
    return [(st["name"], ctx.time(st["begin"], f"stages[{st['name']}].begin"),
             ctx.time(st.get("end"), f"stages[{st['name']}].end")) for st in ctx.stages]


def stage_at(stages: list[tuple[str, int, int | None]], step: int) -> str | None:
    """Name(s) of the recipe stage(s) running at ``step`` ("+"-joined when they overlap), or None.

    ``stages`` comes from :func:`resolve_stages`.

    >>> stage_at([("a", 0, 10), ("b", 10, None)], 12)
    'b'
    """
    return "+".join(name for name, b, e in stages if in_range(step, b, e)) or None
