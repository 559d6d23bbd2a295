"""A run folder of ``sparsify train``: what a checkpoint holds, how it is checked before a resume,
and when an ``--out`` folder may be written into.

The checkpoint files themselves (hash, atomic writes, ``weights_only`` reads) are
:mod:`sparsify.app.checkpoint`; here: which run they belong to, the RNG states, and the rule that
a ``module:function`` model named in a run folder is imported only when the user names it again.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from sparsify.app.checkpoint import (CHECKPOINT, CHECKPOINT_META, CheckpointError, load_checkpoint, meta_digest,
                                     meta_problem, save_checkpoint)
from sparsify.core.extra_state import unpack
from sparsify.core.state import saved_states

__all__ = ["CONFIG", "RUN_FILES", "RUN_KEYS", "load_run", "resume_command", "check_out", "restore",
           "save_run", "checkpoint_meta", "meta_edited", "REPORT", "saved_recipe"]

CONFIG = "config.json"
#: written last by a finished run: a run folder holding it has nothing left to do
REPORT = "report.json"
#: the digest of checkpoint.json's content, kept in the hashed checkpoint.pt so that an edit of the JSON
#: half is seen; the .pt's top-level keys are fixed, the scheduler's state is a plain dict that takes it
JSON_DIGEST = "checkpoint_json_sha256"
#: what a run writes into its folder (``--overwrite`` replaces these, and only these: :mod:`sparsify.app.replace`)
RUN_FILES = (CONFIG, CHECKPOINT, CHECKPOINT_META, REPORT, "history.json", "final_state_dict.pt",
             "ema_final_state_dict.pt",
             "layers.png", "training.png")
#: the settings that define a run: a checkpoint is resumed only into a run with the same ones
RUN_KEYS = ("model", "recipe", "overrides", "data", "image_size", "width", "epochs", "batch_size", "optimizer",
            "lr", "weight_decay", "momentum", "seed", "ema", "amp")


def resume_command(folder, model: str) -> str:
    """The command that continues the run in ``folder``: a ``module:function`` model is named, since
    resuming imports it only when the command line does (:func:`load_run`).

    >>> resume_command("runs/a", "resnet18"), resume_command("runs/b", "mine:net")
    ('sparsify train --resume runs/a', 'sparsify train --resume runs/b --model mine:net')
    """
    return f"sparsify train --resume {folder}" + (f" --model {model}" if ":" in model else "")


def load_run(folder: Path, given_model: str | None, default_model: str) -> tuple[dict, dict, dict]:
    """``(saved config, checkpoint tensors, checkpoint meta)`` of the run in ``folder``, all
    checked; nothing is imported or written here. ``given_model``: the model the user named (None
    or ``default_model`` when not named)."""
    missing = [name for name in (CONFIG, CHECKPOINT) if not (folder / name).is_file()]
    if CONFIG in missing:
        raise FileNotFoundError(f"--resume {folder}: no {' and '.join(missing)} there (is it the --out folder "
                                "of a sparsify train run?)")
    if missing and not (folder / CHECKPOINT_META).is_file():
        raise FileNotFoundError(f"--resume {folder}: the run stopped before its first checkpoint (only {CONFIG} "
                                f"there): start it again, with --out {folder} (the folder is reused)")
    try:
        saved = json.loads((folder / CONFIG).read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--resume {folder}: {CONFIG} is damaged ({e})") from None
    model = saved.get("model")
    if isinstance(model, str) and ":" in model and given_model != model:
        # a module:function factory is code: run it only when the user names it on the command line
        raise CheckpointError(f"--resume {folder}: the run's model is {model!r}, code that resuming would import; "
                              f"name it to allow that: --resume {folder} --model {model}")
    if given_model not in (None, model, default_model):
        raise CheckpointError(f"--resume {folder}: --model {given_model} is not the run's model ({model!r})")
    tensors, meta = load_checkpoint(folder)
    if (bad := meta_problem(meta)) is not None:
        raise CheckpointError(f"--resume {folder}: {CHECKPOINT_META} has {bad} (edited or damaged); the run cannot be "
                              "resumed from it")
    run = {k: saved.get(k) for k in RUN_KEYS}
    if meta.get("run") != run:
        diff = [k for k in RUN_KEYS if (meta.get("run") or {}).get(k) != run[k]]
        raise CheckpointError(f"--resume {folder}: {CHECKPOINT} was made by another run than {CONFIG} describes "
                              f"(different {', '.join(diff) or 'settings'}); copy the whole folder of that run instead")
    return saved, tensors, meta


def saved_recipe(tensors: dict) -> dict | None:
    """The resolved recipe (its overrides applied) that the model in a checkpoint was sparsified with:
    ``sparsify`` keeps it in the model's ``state_dict``, so a run folder holds its own recipe whatever
    becomes of the file it was read from. None for a dense run's checkpoint."""
    model = tensors.get("model")
    states = saved_states(model) if isinstance(model, dict) else []
    if not states:
        return None
    try:
        recipe = json.loads(unpack(model[states[0][1]])["recipe"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):  # the model's own load check says what is wrong
        return None
    return recipe if isinstance(recipe, dict) else None


def check_out(out: Path, overwrite: bool) -> list[str]:
    """Refuse an ``out`` folder that cannot take a new run, changing nothing (a run checks it before
    the data loads and the model is sparsified); returns the run files ``overwrite`` will remove."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out}: {existing} is a file, not a folder (Not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {existing} is not writable (permission denied)")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held == [CONFIG]:  # a run that stopped before its first checkpoint: nothing to continue, start again
        return []
    if held and not overwrite:
        raise FileExistsError(f"--out {out} holds another run ({', '.join(held[:3])}); continue it with "
                              f"--resume {out}, or pass --overwrite to replace it")
    return held


def checkpoint_meta(**fields) -> dict:
    """The JSON half of a checkpoint: ``fields`` plus the Python and NumPy RNG states."""
    py, npy = random.getstate(), np.random.get_state()
    return {**fields, "rng_python": [py[0], list(py[1]), py[2]],
            "rng_numpy": [npy[0], npy[1].tolist(), *(v.item() if hasattr(v, "item") else v for v in npy[2:])]}


def save_run(model, optimizer, sched, out: Path, ema=None, device: torch.device | None = None, **fields) -> None:
    """Write the checkpoint of a run: state dicts (``ema``: the weight average's too) and torch's
    RNG states (the CPU's, and the CUDA device's a run on one draws from) as tensors, the rest as JSON."""
    meta = checkpoint_meta(**fields)
    tensors = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": {**sched.state_dict(), JSON_DIGEST: meta_digest(meta)},
               "rng_torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
    if ema is not None:
        tensors["ema"] = ema.state_dict()
    save_checkpoint(tensors, meta, out)


def meta_edited(tensors: dict, meta: dict) -> bool:
    """``checkpoint.json`` no longer holds what was saved with ``checkpoint.pt`` (its field checks
    pass values that are well-formed but not the run's, an edited accuracy in the history)."""
    sched = tensors.get("scheduler")
    saved = sched.get(JSON_DIGEST) if isinstance(sched, dict) else None
    return saved is not None and saved != meta_digest(meta)  # None: written before the digest was kept


def restore(model, optimizer, sched, tensors: dict, meta: dict, folder: str, ema=None,
            device: torch.device | None = None) -> None:
    """Load a checked checkpoint into a freshly built run; one line when it does not fit."""
    try:
        model.load_state_dict(tensors["model"])
        if ema is not None:
            ema.load_state_dict(tensors["ema"])
        optimizer.load_state_dict(tensors["optimizer"])
        sched.load_state_dict({k: v for k, v in tensors["scheduler"].items() if k != JSON_DIGEST})
        torch.set_rng_state(tensors["rng_torch"])
        if "rng_cuda" in tensors and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng_cuda"], device)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        what = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise CheckpointError(f"--resume {folder}: {CHECKPOINT} does not fit the model and optimizer of this run "
                              f"({what[:300]})") from None
    py = meta["rng_python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["rng_numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))
