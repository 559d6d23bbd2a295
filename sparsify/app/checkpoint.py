"""Files of a ``sparsify train`` run: written so that an interrupt loses nothing, read so that a
damaged or foreign file changes nothing and runs no code.

* ``checkpoint.pt`` holds tensors only (model, optimizer and scheduler state, torch's RNG state)
  and is read with ``torch.load(weights_only=True)``: a crafted file cannot run code;
* ``checkpoint.json`` beside it holds the rest (epoch, batch, history, Python and NumPy RNG states,
  the run's settings) and the SHA-256 and size of ``checkpoint.pt``, checked before it is read: a
  flipped byte, a truncated or empty file, or a checkpoint copied from another run is refused with
  one line (:class:`CheckpointError`); a run keeps :func:`meta_digest` of the JSON in ``checkpoint.pt``
  (:mod:`sparsify.app.resume`), so an edited value is refused too;
* writes are atomic (temporary file + ``os.replace``); the temporary files of an interrupted write
  are removed (by the writer when it can, else by the next run in that folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch

__all__ = ["save_atomic", "write_json", "StopOnSigint", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "remove_stale_temporaries", "meta_digest", "CHECKPOINT", "CHECKPOINT_META"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_META = "checkpoint.json"
FORMAT = 1
_TMP_MARK = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, from another run, unreadable): one line."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash or a
    Ctrl-C while writing leaves the previous file intact, and the temporary file is removed."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        _save_synced(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_synced(obj, path: Path) -> None:
    """``torch.save`` that returns only once the bytes are on disk."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_json(obj, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file in the same folder,
    then ``os.replace``): a crash while writing leaves the previous file intact. Values JSON cannot
    hold (paths, dtypes) are written as their ``str``.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "report.json"
    >>> write_json({"epoch": 1, "out": Path("runs")}, path); json.loads(path.read_text())
    {'epoch': 1, 'out': 'runs'}
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the temporary files a killed writer left in ``folder`` (``.<name>.tmp<pid>``)."""
    removed = []
    for p in Path(folder).glob(f".*{_TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def save_checkpoint(tensors: dict, meta: dict, folder: Path) -> None:
    """Write ``tensors`` (tensors and plain containers only) to ``checkpoint.pt`` and ``meta``
    (JSON-able) with the file's hash to ``checkpoint.json``, each atomically, .pt first."""
    folder = Path(folder)
    pt = folder / CHECKPOINT
    tmp = _tmp_name(pt)
    try:
        _save_synced(tensors, tmp)
        digest, size = _sha256(tmp), tmp.stat().st_size
        os.replace(tmp, pt)
    finally:
        tmp.unlink(missing_ok=True)
    write_json({"format": FORMAT, "sha256": digest, "size": size, **meta}, folder / CHECKPOINT_META)


def meta_digest(meta: dict) -> str:
    """SHA-256 of a checkpoint description's content (without the keys :func:`save_checkpoint` adds)
    as it reads back from ``checkpoint.json``: the same before writing and after reading.

    >>> meta_digest({"epoch": 1, "t": (0.5,)}) == meta_digest({"t": [0.5], "epoch": 1, "sha256": "x"})
    True
    """
    content = json.loads(json.dumps({k: v for k, v in meta.items() if k not in ("format", "sha256", "size")},
                                    default=str))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of the checkpoint in ``folder``, after checking its size and hash;
    read with ``weights_only=True``. Raises :class:`CheckpointError` (one line) otherwise."""
    folder = Path(folder)
    pt, js = folder / CHECKPOINT, folder / CHECKPOINT_META
    where = f"--resume {folder}"
    if not pt.is_file() or not js.is_file():
        missing = " and ".join(p.name for p in (pt, js) if not p.is_file())
        raise CheckpointError(f"{where}: no {missing} there (is it the --out folder of a sparsify train run "
                              "that saved a checkpoint?)")
    try:
        meta = json.loads(js.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not a checkpoint description of this version")
        digest, size = str(meta["sha256"]), int(meta["size"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: {CHECKPOINT_META} is damaged or not from sparsify train ({e}); "
                              "the run cannot be resumed from it") from None
    actual = pt.stat().st_size
    if actual != size:
        raise CheckpointError(f"{where}: {CHECKPOINT} has {actual} bytes, {CHECKPOINT_META} says {size} "
                              "(truncated, empty or replaced); the run cannot be resumed from it")
    if _sha256(pt) != digest:
        raise CheckpointError(f"{where}: {CHECKPOINT} does not match the SHA-256 in {CHECKPOINT_META} (the file "
                              "is corrupted or was changed); the run cannot be resumed from it")
    try:
        tensors = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # anything torch.load refuses: a foreign or crafted file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: {CHECKPOINT} cannot be read as plain tensors ({first[:200]})") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{where}: {CHECKPOINT} does not hold a sparsify train checkpoint")
    return tensors, meta


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def meta_problem(meta: dict) -> str | None:
    """What is wrong with the position, history and RNG states of a checkpoint's JSON half, or None
    (its digest says only that it was edited: these checks say what is wrong, and a value a crafted
    file could crash the run with is caught before the digest is compared).

    >>> meta_problem({"epoch": -5, "batch": 0})
    'epoch -5 (not a count of epochs)'
    """
    for key, unit in (("epoch", "epochs"), ("batch", "batches")):
        v = meta.get(key)
        if not _is_int(v) or v < 0:
            return f"{key} {v!r} (not a count of {unit})"
    history, running = meta.get("history"), meta.get("running")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history) or len(history) != meta["epoch"]:
        return "a history that is not one record per finished epoch"
    if not isinstance(running, dict) or not all(isinstance(running.get(k), (int, float)) and not isinstance(
            running.get(k), bool) and running[k] >= 0 for k in ("loss", "correct", "seen")):
        return "running totals that are not numbers"
    seconds = meta.get("seconds", 0.0)  # absent in checkpoints written before it was kept
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
        return f"seconds {seconds!r} (not a time)"
    if not isinstance(meta.get("dataset", {}), dict):
        return "a dataset description that is not one"
    py, npy = meta.get("rng_python"), meta.get("rng_numpy")
    if not (isinstance(py, list) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], list) and len(py[1]) == 625
            and all(_is_int(v) and 0 <= v < 2 ** 32 for v in py[1]) and (py[2] is None or isinstance(py[2], float))):
        return "a Python RNG state that is not one"
    if not (isinstance(npy, list) and len(npy) == 5 and npy[0] == "MT19937" and isinstance(npy[1], list)
            and len(npy[1]) == 624 and all(_is_int(v) and 0 <= v < 2 ** 32 for v in npy[1]) and _is_int(npy[2])
            and 0 <= npy[2] <= 624 and _is_int(npy[3]) and isinstance(npy[4], (int, float))):
        return "a NumPy RNG state that is not one"
    return None


class StopOnSigint:
    """First SIGINT: ask the loop to stop after the current step. Second: KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C handling stays Python's default
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
