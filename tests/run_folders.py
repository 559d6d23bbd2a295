"""Helpers for tests of ``sparsify train`` run folders: a folder's content by hash, and a command
that must fail with one line (``from run_folders import ...``; pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import hashlib

from sparsify.app.cli import main


def snapshot(folder) -> dict:
    """``{file name: sha256}`` of the files in ``folder``: equal snapshots, nothing written."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def cli_error(capsys, argv) -> str:
    """Run the command ``argv``; it must exit 2 with one line on stderr and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
