"""The warnings of a ``sparsify train`` run as ``warning: ...`` lines, and in its ``report.json``.

Python's own format (``/path/train.py:257: UserWarning: ...`` plus the calling source line) broke
into the progress bar and named the loop's code, not the run; here each distinct warning is one
line on stderr, written above the bar, and every one is kept for the report, so a run whose
output scrolled away, or a quiet one (the demo), still says what went wrong.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator

__all__ = ["warning_lines"]


@contextlib.contextmanager
def warning_lines(quiet: bool = False) -> Iterator[list[str]]:
    """Inside, a warning that passes the filters is printed once as ``warning: MESSAGE`` (unless
    ``quiet``) and appended to the list this yields; filters (``-W error``, ``-W ignore``) still apply.

    >>> with warning_lines(quiet=True) as seen:
    ...     warnings.simplefilter("always")  # Python's own once-per-place filter off: still once here
    ...     for _ in range(2):
    ...         warnings.warn("a layer pruned to 100%")
    >>> seen
    ['a layer pruned to 100%']
    """
    seen: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text in seen:
            return
        seen.append(text)
        if not quiet:
            from tqdm import tqdm
            tqdm.write(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield seen
