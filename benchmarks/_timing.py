"""Interleaved timing shared by the deployment benchmarks: every model runs once per round, in
turn, so load from other processes on the machine hits all of them alike. Both the median and
the fastest round are kept: on a loaded machine other processes only ever add time, so the
fastest round is the better estimate of the code's own cost, the median the more cautious one."""
from __future__ import annotations

import statistics
import time

import torch


def add_interleaved_args(ap) -> None:
    """The options of the benchmarks timed with :func:`interleaved`: ``--rounds``, ``--threads``
    (default 2) and ``--cpu-time``."""
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="time by process CPU time (steadier under load; "
                    "use with --threads 1)")


def add_clock_args(ap) -> None:
    """The timing options of the SAS benchmarks: ``--threads`` (default: torch's) and ``--clock``;
    :func:`clock_from_args` applies them."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: this process's CPU time (use with --threads 1 under load)")


def clock_from_args(args):
    """Set ``--threads`` (when given) and return the timer ``--clock`` names."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return clock_of(args.clock == "cpu")


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
