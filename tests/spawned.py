"""Starting the processes of a distributed test (gloo on the CPU): ``spawn(worker, *args)``.

A worker killed by a signal (not by a Python exception) is started once more, with a warning
that names the signal: under the full suite on 2 busy cores, a gloo worker was killed by
SIGSEGV or SIGABRT about once in a dozen runs and never in a rerun (torch's gloo threads torn
down at exit). A second such death, or any Python exception in a worker, fails the test.
"""
from __future__ import annotations

import socket
import warnings

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args, nprocs: int = 2) -> None:
    """``mp.spawn(worker, args=(port, *args), nprocs=nprocs)`` on a free port (see the module docstring)."""
    for attempt in (1, 2):
        try:
            mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as e:
            if attempt == 2 or not e.signal_name:
                raise
            warnings.warn(f"{getattr(worker, '__module__', '')}.{getattr(worker, '__name__', worker)}: worker "
                          f"{e.error_index} (pid {e.error_pid}) was killed by {e.signal_name}; starting the "
                          "processes once more", RuntimeWarning, stacklevel=2)
