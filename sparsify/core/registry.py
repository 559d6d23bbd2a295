"""The method registry: recipe method names -> :class:`~sparsify.core.contract.Method` objects.

A method file registers its class with :func:`register`; :mod:`sparsify.methods` imports every
method module, so importing the package fills the registry.
"""
from __future__ import annotations

import sys

from sparsify.core.contract import Method

__all__ = ["REGISTRY", "BUILT_IN_NAMES", "register", "get_method"]

REGISTRY: dict[str, Method] = {}

#: the names of sparsify.methods' methods: a user's method registered before that package is
#: imported (``import sparsify`` does not import it) is refused under one of them here, rather
#: than failing later inside the built-in's import (core does not import methods: this list is
#: kept equal to the package's by a test)
BUILT_IN_NAMES = frozenset({"activation-hoyer", "activation-l1", "l1-prune", "magnitude", "nm", "sas",
                            "semi-structured", "st3", "str", "tl1"})


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``.

    >>> from sparsify.core.contract import Method
    >>> @register
    ... class Demo(Method):
    ...     '''Recipe method ``demo-doc``: no params.'''
    ...     name = "demo-doc"
    >>> get_method("demo-doc").name
    'demo-doc'
    >>> del REGISTRY["demo-doc"]

    The same class defined again (a notebook cell run twice, a module reloaded: the same module and
    qualified name) replaces the first; another class under a name already registered is an error,
    as is a name with a '.' (it names the method's group module), and a built-in method's name
    (before ``sparsify.methods`` is imported too; ``del REGISTRY[name]`` after importing it frees
    the name).

    >>> @register
    ... class Dotted(Method):
    ...     name = "my.method"
    Traceback (most recent call last):
    ValueError: Dotted.name is 'my.method': a method's name is a string without '.' (letters, digits, '-' and '_')
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name: set the class attribute `name` recipes use")
    if not isinstance(cls.name, str) or "." in cls.name:  # it names the method's group module (rule0_<name>)
        raise ValueError(f"{cls.__name__}.name is {cls.name!r}: a method's name is a string without '.' "
                         "(letters, digits, '-' and '_')")
    if (cls.name in BUILT_IN_NAMES and "sparsify.methods" not in sys.modules
            and cls.__module__.split(".")[0] != "sparsify"):
        raise ValueError(f"method {cls.name!r} is a built-in method's name ({cls.__module__}.{cls.__qualname__}): "
                         "give yours another name")
    old = type(REGISTRY[cls.name]) if cls.name in REGISTRY else cls
    if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method {cls.name!r} is registered twice ({old.__module__}.{old.__qualname__} and "
                         f"{cls.__module__}.{cls.__qualname__}): give one of them another name, or del "
                         f"sparsify.core.registry.REGISTRY[{cls.name!r}] first")
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ``KeyError`` listing the known ones otherwise.

    >>> import sparsify.methods
    >>> get_method("st3").name
    'st3'
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}") from None
