"""tests/spawned.py: a distributed test's processes are started once more when one is killed by a
signal, never when one raises."""
from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch.multiprocessing as mp

from spawned import spawn


def _dies_once(rank, port, flag):
    if rank == 1 and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _raises(rank, port, flag):
    open(flag + str(rank), "a").write("x")
    if rank == 1:
        raise ValueError("a failing assertion in a worker")


def test_a_worker_killed_by_a_signal_is_started_again_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spawn(_dies_once, str(tmp_path / "flag"))
    said = [str(w.message) for w in caught if "killed by SIGKILL" in str(w.message)]
    assert len(said) == 1 and "worker 1" in said[0]


def test_a_worker_that_raises_fails_at_once(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a failing assertion in a worker"):
        spawn(_raises, str(tmp_path / "ran"))
    assert (tmp_path / "ran1").read_text() == "x"  # started once, not twice
