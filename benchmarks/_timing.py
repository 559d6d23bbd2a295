"""Interleaved timing shared by the deployment benchmarks: every model runs once per round, in
turn, so load from other processes on the machine hits all of them alike. Both the median and
the fastest round are kept: on a loaded machine other processes only ever add time, so the
fastest round is the better estimate of the code's own cost, the median the more cautious one."""
from __future__ import annotations

import statistics
import time

import torch


def clock_of(cpu_time: bool):
    """The timer: wall time, or with ``cpu_time`` this process's CPU time (all its threads). CPU
    time is the steadier measure on a machine shared with other jobs, where wall time also counts
    the time this process waited for a core; with more than one thread it also counts OpenMP's
    spin-waiting, so use it with ``--threads 1``."""
    return time.process_time if cpu_time else time.perf_counter


@torch.no_grad()
def interleaved(fns: dict, rounds: int = 30, warmup: int = 3, clock=time.perf_counter) -> dict[str, dict[str, float]]:
    """``{name: {"median": ms, "min": ms}}`` for each zero-argument call in ``fns``, run round-robin."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = clock()
            f()
            samples[k].append(1e3 * (clock() - t))
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in samples.items()}


def load_average() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")
