"""The per-layer path decision: time each candidate implementation on the layer's real input
shape and keep the fastest (or apply a fixed policy), and the report of what each layer took."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

__all__ = ["LayerPath", "AccelerationReport", "choose", "time_calls", "DECISIONS"]

# "measure": time every candidate, take the fastest (a sparse path must beat dense by ``margin``);
# "always": take the first sparse candidate whenever the layer is eligible (tests, or when the
#           deployment CPU differs from the one converting); "never": keep everything dense.
DECISIONS = ("measure", "always", "never")


@dataclass
class LayerPath:
    """Which implementation one layer got, and why."""

    name: str
    kind: str  # e.g. "Conv2d 3x3", "Linear", "Conv2d 1x1"
    path: str  # "dense", "patch-skip", "csr", "bsr16", ...
    reason: str
    sparsity: float | None = None  # weight sparsity (Linear / 1x1) or skipped position fraction (patch-skip)
    times_ms: dict = field(default_factory=dict)  # candidate -> fastest of the timed runs (ms), this input


@dataclass
class AccelerationReport:
    """What :func:`sparsify.deploy.accelerate.accelerate` did to each candidate layer; ``str()`` is a table.

    >>> r = AccelerationReport([LayerPath("fc", "Linear", "csr", "fastest", 0.9, {"dense": 2.0, "csr": 1.0})])
    >>> r.count()
    {'csr': 1}
    """

    layers: list[LayerPath]
    decide: str = "measure"
    input_shapes: list = field(default_factory=list)
    folded_bn: int = 0  # BatchNorms folded into convs that are not listed (plain conv -> BN pairs)

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.layers:
            out[row.path] = out.get(row.path, 0) + 1
        return out

    def path_of(self, name: str) -> str:
        return next(r.path for r in self.layers if r.name == name)

    def to_dict(self) -> dict:
        return {"decide": self.decide, "input_shapes": self.input_shapes, "paths": self.count(),
                "folded_bn": self.folded_bn,
                "layers": [asdict(r) for r in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        def fmt_t(t):
            return ", ".join(f"{k} {v:.3f}" for k, v in t.items()) or "-"
        rows = [("layer", "kind", "path", "sparsity", "times (ms)", "why")]
        for r in self.layers:
            rows.append((r.name, r.kind, r.path, "-" if r.sparsity is None else f"{100 * r.sparsity:.1f}%",
                         fmt_t(r.times_ms), r.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = [f"acceleration ({self.decide}): " + ", ".join(f"{k}: {v}" for k, v in self.count().items())
                 + (f"; BN folded into {self.folded_bn} other convs" if self.folded_bn else "")]
        lines += ["  ".join([c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]) for row in rows]
        return "\n".join(lines)


@torch.no_grad()
def _clock(clock: str):
    if clock == "auto":  # one thread: CPU time is the work itself, without the waits for a core
        clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'auto', 'wall' or 'cpu', got {clock!r}")
    return time.process_time if clock == "cpu" else time.perf_counter


def time_calls(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2,
               clock: str = "auto") -> dict[str, float]:
    """Fastest time of each call in milliseconds, the calls run in turn (round-robin).

    Why the minimum, interleaved: on a shared machine other processes only ever add time, and a
    burst of load then hits every candidate alike instead of whichever ran during it. ``clock``:
    ``"wall"``, ``"cpu"`` (process CPU time), or ``"auto"``: CPU time when torch runs one thread
    (steadier under load: waiting for a core is not counted), else wall time (with several
    threads CPU time would also count OpenMP's spin-waiting).

    >>> sorted(time_calls({"a": lambda: None, "b": lambda: None}, repeats=3))
    ['a', 'b']
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    now = _clock(clock)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = now()
            f()
            best[k] = min(best[k], 1e3 * (now() - t))
    return best


def choose(candidates: dict[str, Callable[[], object]], decide: str = "measure", margin: float = 0.05,
           repeats: int = 7, clock: str = "auto") -> tuple[str, dict[str, float], str]:
    """Pick among ``candidates`` (name -> zero-argument call; ``"dense"`` must be one of them).

    Returns ``(name, times in ms, why)``. Under ``"measure"`` a sparse candidate wins only if it
    is at least ``margin`` faster than dense, so timing noise does not swap layers for nothing.

    >>> choose({"dense": lambda: None, "csr": lambda: None}, decide="always")[0]
    'csr'
    """
    if decide not in DECISIONS:
        raise ValueError(f"decide must be one of {DECISIONS}, got {decide!r}")
    sparse = [k for k in candidates if k != "dense"]
    if decide == "never" or not sparse:
        return "dense", {}, "acceleration off (decide='never')" if decide == "never" else "no sparse candidate"
    if decide == "always":
        return sparse[0], {}, "eligible (decide='always')"
    times = time_calls(candidates, repeats=repeats, clock=clock)
    best = min(sparse, key=times.get)
    if times[best] <= (1 - margin) * times["dense"]:
        return best, times, f"fastest: {times['dense'] / times[best]:.2f}x dense on this input"
    return "dense", times, f"no sparse path beat dense by {100 * margin:.0f}% on this input"
