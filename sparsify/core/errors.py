"""The error a recipe causes. It lives in core so that core's own recipe-time errors (a schedule
time that cannot be resolved: :class:`sparsify.core.schedules.ScheduleError`) can be one;
``sparsify.RecipeError`` and ``sparsify.prepare.recipe.RecipeError`` name this class."""
from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe is malformed; the message says where (the recipe's source, then a JSON path) and what.

    >>> import sparsify
    >>> try:
    ...     sparsify.load_recipe({"version": 1, "rules": [{"match": {"typ": "Linear"}, "method": "st3"}]})
    ... except sparsify.RecipeError as e:
    ...     print(str(e)[:63])
    <dict>: invalid recipe: $.rules[0].match.typ: unknown key 'typ'
    """
