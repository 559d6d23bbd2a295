"""The warnings a call raises, as message strings, every one (repeats included): shared by tests
that check what a user is told."""
from __future__ import annotations

import warnings


def warned(fn, *args, **kwargs) -> tuple[object, list[str]]:
    """``fn(*args, **kwargs)``'s result and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


def said(fn, *args, **kwargs) -> list[str]:
    """The messages of the warnings ``fn(*args, **kwargs)`` raised."""
    return warned(fn, *args, **kwargs)[1]
