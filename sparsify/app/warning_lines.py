"""The warnings of a ``sparsify train`` run as ``warning: ...`` lines, and in its ``report.json``.

Python's own format (``/path/train.py:257: UserWarning: ...`` plus the calling source line) broke
into the progress bar and named the loop's code, not the run; here each distinct warning is one
line on stderr, written above the bar, and every one is kept for the report, so a run whose
output scrolled away, or a quiet one (the demo), still says what went wrong.
"""
from __future__ import annotations

import contextlib
import re
import sys
import warnings
from typing import Iterator

__all__ = ["warning_lines"]


@contextlib.contextmanager
def warning_lines(quiet: bool = False) -> Iterator[list[str]]:
    """Inside, a warning that passes the filters is printed once as ``warning: MESSAGE`` (unless
    ``quiet``) and appended to the list this yields; filters (``-W error``, ``-W ignore``) still apply.
    A message that differs only in the call that says it (``sparsify.step: fc: ...``, then
    ``sparsify.finalize: fc: ...``) is the same finding, said once.

    >>> with warning_lines(quiet=True) as seen:
    ...     warnings.simplefilter("always")  # Python's own once-per-place filter off: still once here
    ...     for _ in range(2):
    ...         warnings.warn("sparsify.step: fc pruned to 100%")
    ...     warnings.warn("sparsify.finalize: fc pruned to 100%")
    >>> seen
    ['sparsify.step: fc pruned to 100%']
    """
    seen: list[str] = []
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        # the same finding from another call (sparsify.step, then the write-up's sparsify.finalize)
        key = re.sub(r"^sparsify(\.\w+)?: ", "", text)
        if key in said:
            return
        said.add(key)
        seen.append(text)
        if not quiet:
            from tqdm import tqdm
            tqdm.write(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield seen
