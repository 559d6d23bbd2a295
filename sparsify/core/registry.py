"""The method registry: recipe method names -> :class:`~sparsify.core.contract.Method` objects.

A method file registers its class with :func:`register`; :mod:`sparsify.methods` imports every
method module, so importing the package fills the registry.
"""
from __future__ import annotations

from sparsify.core.contract import Method

__all__ = ["REGISTRY", "register", "get_method"]

REGISTRY: dict[str, Method] = {}


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
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name: set the class attribute `name` recipes use")
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({type(REGISTRY[cls.name]).__name__} "
                         f"and {cls.__name__})")
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
