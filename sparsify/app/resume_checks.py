"""The checks a resumed ``sparsify train`` run passes before it trains on: the data is the data the
run started with, and ``checkpoint.json`` places the run where its length and the hashed
checkpoint's scheduler say (an edited or damaged ``checkpoint.json`` is named, not resumed).

Apart from :mod:`sparsify.app.train` because they only read the saved run and raise; the
checkpoint files' own checks (hashes, which run they belong to) are :mod:`sparsify.app.checkpoint`
and :mod:`sparsify.app.resume`.
"""
from __future__ import annotations

from sparsify.app.checkpoint import CHECKPOINT, CHECKPOINT_META, CheckpointError
from sparsify.app.config import TrainConfig
from sparsify.app.results import counted

__all__ = ["check_same_data", "check_position"]


def _data_change(then: dict, now: dict) -> str:
    """What differs between two :func:`~sparsify.app.data.fingerprint` s, in words.

    >>> _data_change({"train": 8, "test": 2, "files": 10}, {"train": 9, "test": 2, "files": 11})
    '11 files now, 10 then; 9 train / 2 test images now, 8 / 2 then'
    """
    said = []
    if then.get("files") != now.get("files"):
        said.append(f"{counted(now.get('files'), 'file')} now, {then.get('files')} then")
    elif then.get("sha256") != now.get("sha256"):
        said.append("the same number of files, but other names or sizes")
    if (then.get("train"), then.get("test")) != (now["train"], now["test"]):
        said.append(f"{now['train']} train / {now['test']} test images now, "
                    f"{then.get('train')} / {then.get('test')} then")
    return "; ".join(said) or "another dataset"


def _edited(cfg: TrainConfig) -> CheckpointError:
    return CheckpointError(f"--resume {cfg.resume}: {CHECKPOINT_META} is not what was saved with {CHECKPOINT} "
                           "(edited or damaged); the run cannot be resumed from it")


def check_same_data(cfg: TrainConfig, meta: dict, dataset: dict) -> None:
    """Refuse to resume on data other than the run's (``dataset``: the data's fingerprint now)."""
    if meta.get("dataset", dataset) != dataset:
        change = _data_change(meta["dataset"], dataset)
        raise CheckpointError(f"--resume {cfg.resume}: the data changed since the run started ({change}); its "
                              "train/test split and schedule would not be the run's: restore the data, or start a "
                              "new run")


def check_position(cfg: TrainConfig, ckpt: dict, meta: dict, steps_per_epoch: int, edited: bool) -> None:
    """Refuse a ``checkpoint.json`` whose position is outside the run or not the scheduler's, or that
    was edited (``edited``: its digest differs)."""
    epoch, batch = meta["epoch"], meta["batch"]
    if epoch > cfg.epochs or batch >= steps_per_epoch or (epoch == cfg.epochs and batch):
        raise CheckpointError(f"--resume {cfg.resume}: {CHECKPOINT_META} places the run at epoch {meta['epoch']}, "
                              f"batch {meta['batch']}, outside its {counted(cfg.epochs, 'epoch')} of "
                              f"{counted(steps_per_epoch, 'batch')} (edited or damaged); the run cannot be "
                              "resumed from it")
    # its position must be the one the hashed scheduler counted (checked before the JSON's digest,
    # which can only say "edited", so that an edited position is named)
    saved_sched = ckpt.get("scheduler")
    done = saved_sched.get("last_epoch") if isinstance(saved_sched, dict) else None
    if done != epoch * steps_per_epoch + batch:
        raise CheckpointError(f"--resume {cfg.resume}: {CHECKPOINT_META} places the run at step "
                              f"{epoch * steps_per_epoch + batch} (epoch {epoch}, batch {batch}), {CHECKPOINT} "
                              f"at step {done} (edited or damaged); the run cannot be resumed from it")
    if edited:
        raise _edited(cfg)
