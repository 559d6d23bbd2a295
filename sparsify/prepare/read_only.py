"""Read-only JSON values: a loaded recipe's ``data`` and its rules' ``match`` and ``params``.

``sparsify`` builds from a recipe's JSON (``recipe.data``): an edit of a rule would be ignored,
and an edit of the JSON would be used while the rules still say the loaded value, so both raise
(docs/recipes.md).
"""
from __future__ import annotations

__all__ = ["ReadOnlyDict", "ReadOnlyList", "read_only", "editable"]


_READ_ONLY = ("a loaded recipe is read-only (sparsify builds from the recipe's JSON, recipe.data): "
              "set a parameter with an override, load_recipe(spec, sparsity=0.8) or sparsify(model, recipe, "
              "sparsity=0.8), or edit a copy, copy.deepcopy(recipe.data), and pass that")


class ReadOnlyDict(dict):
    """A dict that refuses every edit (a rule's ``match`` and ``params``, a recipe's ``data``); its
    shallow copies and pickles are read-only too, ``copy.deepcopy(d)`` is an editable plain copy
    (the way to edit a recipe), ``dict(d)`` one of its top level.

    >>> d = ReadOnlyDict(sparsity=0.9)
    >>> d["sparsity"] = 0.1
    Traceback (most recent call last):
    ...
    TypeError: a loaded recipe is read-only (sparsify builds from the recipe's JSON, recipe.data): set a parameter with an override, load_recipe(spec, sparsity=0.8) or sparsify(model, recipe, sparsity=0.8), or edit a copy, copy.deepcopy(recipe.data), and pass that
    """

    def _refuse(self, *args, **kwargs):
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # built whole by __init__ (pickle's default would set item by item)
        return type(self), (dict(self),)

    def __deepcopy__(self, memo):
        return editable(self)


class ReadOnlyList(list):
    """A list that refuses every edit (a list in a recipe's data or rules); ``list(x)`` is an editable
    copy of its top level, ``copy.deepcopy(x)`` a plain deep one."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = clear = extend = insert = pop = remove = \
        reverse = sort = _refuse

    def __reduce__(self):
        return type(self), (list(self),)

    def __deepcopy__(self, memo):
        return editable(self)


def read_only(value):
    """``value`` (a JSON value) with every dict and list in it read-only.

    >>> type(read_only({"a": [1]})["a"]).__name__
    'ReadOnlyList'
    """
    if isinstance(value, dict):
        return ReadOnlyDict({k: read_only(v) for k, v in value.items()})
    if isinstance(value, list):
        return ReadOnlyList(read_only(v) for v in value)
    return value


def editable(value):
    """A plain, editable deep copy of a JSON value (read-only mappings included).

    >>> type(editable(ReadOnlyDict(a=ReadOnlyList([1])))["a"]).__name__
    'list'
    """
    if isinstance(value, dict):
        return {k: editable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [editable(v) for v in value]
    return value
