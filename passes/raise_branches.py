"""Conditions whose other branch only raises: ``assert seq_len <= self.max_seq_len`` or
``if h % 32: raise RuntimeError(...)`` (segmentation_models_pytorch's input check).

``torch.fx`` cannot decide a condition on a traced value, and the module runs its own forward.
For a condition whose one branch raises, though, the graph can take the other one and check the
condition when it runs (``torch._assert``): it computes what the forward computes whenever the
forward does not raise, and fails where the forward fails. :func:`surviving_value` reads the
calling frame's bytecode to tell which value lets the forward go on, as ``torch.fx.Proxy``'s own
``__iter__`` reads it to count an unpacking; :func:`raise_is_caught` says when a ``try`` in the
traced code would catch that exception (the condition is then left to torch.fx, which fails).
"""
from __future__ import annotations

import dis
import functools
import sys
import types

__all__ = ["surviving_value", "user_frame", "raise_is_caught"]

#: instructions that leave a branch other than by raising
_LEAVES = ("RETURN", "YIELD", "SEND", "FOR_ITER", "END_FOR")
_MAX_SCAN = 400  # instructions followed in one branch before giving up


def user_frame(skip_files: tuple[str, ...]) -> types.FrameType | None:
    """The innermost frame whose code is not in a file ending with one of ``skip_files``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.endswith(skip_files):
        frame = frame.f_back
    return frame


def surviving_value(frame: types.FrameType) -> bool | None:
    """The truth value that lets ``frame`` go on without raising, when the instruction it is at
    tests a value and exactly one of the two branches raises at once; otherwise None.

    >>> class Asked:  # a value whose truth is asked, like a proxy's
    ...     def __bool__(self):
    ...         Asked.said = surviving_value(sys._getframe(1))
    ...         return True
    >>> def check(x):
    ...     assert x, "x must hold"
    >>> def guard(x):
    ...     if x:
    ...         raise ValueError("no")
    >>> def plain(x):
    ...     return 1 if x else 2
    >>> for fn in (check, guard, plain):
    ...     try:
    ...         _ = fn(Asked())
    ...     except ValueError:
    ...         pass
    ...     print(Asked.said)
    True
    False
    None
    """
    return _decide(frame)


def _decide(frame: types.FrameType) -> bool | None:
    instructions, at = _read(frame.f_code)
    i = at.get(frame.f_lasti)
    if i is None:
        return None
    # TO_BOOL (3.13+) asks first; the jump that uses the answer follows (3.11: the jump asks)
    while i < len(instructions) and instructions[i].opname in ("TO_BOOL", "CACHE", "NOP"):
        i += 1
    if i >= len(instructions):
        return None
    jump = instructions[i]
    if "JUMP" not in jump.opname or not ("IF_TRUE" in jump.opname or "IF_FALSE" in jump.opname):
        return None
    if "NONE" in jump.opname:  # `is None` tests are answered by Python, not by the proxy
        return None
    target = at.get(jump.argval)
    if target is None:
        return None
    taken_raises = _raises(instructions, at, target, i + 1)
    through_raises = _raises(instructions, at, i + 1, target)
    if taken_raises == through_raises:
        return None
    jumps_on = "IF_TRUE" in jump.opname  # the value for which the jump is taken
    return (not jumps_on) if taken_raises else jumps_on


@functools.lru_cache(maxsize=512)
def _read(code: types.CodeType) -> tuple[list, dict]:
    """``code``'s instructions and their index by offset (a forward asks many times)."""
    instructions = list(dis.get_instructions(code))
    return instructions, {ins.offset: i for i, ins in enumerate(instructions)}


@functools.lru_cache(maxsize=512)
def _entries(code: types.CodeType):
    """``code``'s exception table (None before Python 3.11, which has none)."""
    return getattr(dis.Bytecode(code), "exception_entries", None)


def _raises(instructions: list, at: dict, start: int, other: int) -> bool:
    """Does every path from instruction ``start`` raise before it returns, loops, yields or
    reaches ``other`` (the first instruction of the other branch)? Local work on the way (a
    message's ternaries and stores) is allowed: the frame is left by the exception."""
    stack, seen = [start], set()
    while stack:
        i = stack.pop()
        while True:
            if i in seen:
                break
            if i == other or i >= len(instructions) or len(seen) > _MAX_SCAN:
                return False
            seen.add(i)
            ins = instructions[i]
            name = ins.opname
            if name in ("RAISE_VARARGS", "RERAISE"):
                break
            if any(stop in name for stop in _LEAVES):
                return False
            if "JUMP" in name:
                target = at.get(ins.argval)
                if target is None or target <= i:  # a loop
                    return False
                if "IF" in name:
                    stack.append(target)
                else:
                    i = target
                    continue
            i += 1
    return True


def raise_is_caught(frame: types.FrameType, skip_dirs: tuple[str, ...], stop) -> bool:
    """Could a ``try`` in ``frame`` or a frame calling it (up to the first frame for which
    ``stop(frame)`` holds; frames of files under ``skip_dirs`` are left out) catch an exception
    raised where ``frame`` is? ``with`` blocks and ``finally`` clauses do not catch (on Python
    3.10, which has no exception table, every ``try`` counts).

    >>> def inner():
    ...     return raise_is_caught(sys._getframe(), (), lambda f: f.f_code.co_name == "<module>")
    >>> def outer(catch):
    ...     if catch:
    ...         try:
    ...             return inner()
    ...         except ValueError:
    ...             return None
    ...     return inner()
    >>> outer(True), outer(False)
    (True, False)
    """
    while frame is not None and not stop(frame):
        if not frame.f_code.co_filename.startswith(skip_dirs) and _caught(frame.f_code, frame.f_lasti):
            return True
        frame = frame.f_back
    return False


def _caught(code: types.CodeType, offset: int) -> bool:
    instructions, at = _read(code)
    entries = _entries(code)
    if entries is None:  # Python 3.10: a try block opened before the offset, handled after it
        return any(ins.opname == "SETUP_FINALLY" and ins.offset < offset < ins.argval for ins in instructions)
    for entry in entries:
        if entry.start <= offset < entry.end and entry.target in at and _catches(instructions[at[entry.target]:]):
            return True
    return False


def _catches(handler: list) -> bool:
    """Does the exception handler starting with ``handler`` catch (``except``), rather than clean
    up and raise again (``with``, ``finally``)?"""
    for ins in handler[:_MAX_SCAN]:
        if ins.opname in ("CHECK_EXC_MATCH", "CHECK_EG_MATCH", "POP_EXCEPT"):
            return True
        if ins.opname in ("WITH_EXCEPT_START", "RERAISE"):
            return False
    return True
