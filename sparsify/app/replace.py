"""``--overwrite``: the run it replaces is kept aside until the new run has saved its first
checkpoint, and put back when the new run ends before that (an error, a diverging loss, a second
Ctrl-C), so a failed replacement does not cost the old run.

The files wait in ``OUT/.overwritten/``. A process killed outright (no Python cleanup) leaves them
there; the next run in that folder removes them, as ``--overwrite`` always did.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sparsify.app.resume import RUN_FILES, check_out

__all__ = ["Replacing", "ASIDE"]

#: where the replaced run's files wait, inside its folder
ASIDE = ".overwritten"


class Replacing:
    """Claims an ``--out`` folder for a new run (``claim``); ``saved()`` after the new run's first
    checkpoint removes the replaced run; leaving the ``with`` block by an exception before that puts it back.

    >>> import tempfile, json
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "report.json").write_text("{}")
    >>> try:
    ...     with Replacing() as r:
    ...         r.claim(out, overwrite=True)
    ...         _ = (out / "config.json").write_text("{}")  # the new run starts, then fails
    ...         raise ValueError("diverged")
    ... except ValueError:
    ...     pass
    >>> sorted(p.name for p in out.iterdir())
    ['report.json']
    """

    def __init__(self) -> None:
        self.out: Path | None = None
        self.aside: Path | None = None

    def claim(self, out: Path, overwrite: bool) -> None:
        """Refuse ``out`` when it holds another run and not ``overwrite``; else move that run aside."""
        held = check_out(out, overwrite)
        self.out = out
        shutil.rmtree(out / ASIDE, ignore_errors=True)  # of a replacement that was killed outright
        if held:
            (out / ASIDE).mkdir()
            for name in held:
                os.replace(out / name, out / ASIDE / name)
            self.aside = out / ASIDE

    def saved(self) -> None:
        """The new run has a checkpoint: the replaced run's files go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def __enter__(self) -> "Replacing":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self.aside is None or self.out is None:
            return
        if kind is None:  # every normal end of a run comes after a checkpoint: the replacement is done
            self.saved()
            return
        for name in RUN_FILES:  # the new run's files, then the old run's back
            (self.out / name).unlink(missing_ok=True)
        for path in self.aside.iterdir():
            os.replace(path, self.out / path.name)
        self.aside.rmdir()
        self.aside = None
