"""How ``sparsify()`` time grows with the size of the graph, against ``torch.fx.symbolic_trace``.

    .venv/bin/python benchmarks/sparsify_scaling.py [--recipe st3] [--out docs/coverage.md]

A synthetic residual CNN with ``n`` blocks (conv-bn-relu-conv-bn + skip + relu: 8 graph nodes and
2 Conv2d per block, 8 channels, 8x8 input so the forward passes cost little) is built for graph
sizes from about 100 to 10,000 nodes. For each size, the median of 3 runs of
``torch.fx.symbolic_trace`` and of ``sparsify.sparsify`` (same process, same model) gives the time
per node. ``--out`` appends (or replaces) a "Scaling" section in that markdown file.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.fx as fx
from torch import nn

import sparsify


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def chain(blocks: int, c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[Block(c) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def median_time(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="st3")
    ap.add_argument("--blocks", type=int, nargs="*", default=[12, 60, 125, 250, 625, 1250])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    x = torch.zeros(1, 3, 8, 8)
    rows = []
    for b in args.blocks:
        model = chain(b)
        nodes = len(fx.symbolic_trace(model).graph.nodes)
        t_trace = median_time(lambda: fx.symbolic_trace(model))
        t_sp = median_time(lambda: sparsify.sparsify(model, args.recipe, total_steps=100, example_inputs=x))
        t_plan = median_time(lambda: sparsify.plan(model, args.recipe, total_steps=100, example_inputs=x))
        rows.append((nodes, t_trace, t_sp, t_plan))
        print(f"{nodes:6d} nodes: symbolic_trace {t_trace:.3f}s, sparsify {t_sp:.3f}s "
              f"({1e3 * t_sp / nodes:.3f} ms/node, {t_sp / t_trace:.1f}x trace), plan {t_plan:.3f}s", flush=True)
    n0, _, s0, p0 = rows[0]
    n1, _, s1, p1 = rows[-1]
    import math
    import os
    slope = math.log(s1 / s0) / math.log(n1 / n0)
    slope_plan = math.log(p1 / p0) / math.log(n1 / n0)
    lines = ["", "## Scaling", "",
             f"`sparsify()` time against graph size (`.venv/bin/python benchmarks/sparsify_scaling.py "
             f"--recipe {args.recipe} --out docs/coverage.md`; synthetic residual CNN, 8 graph nodes and "
             "2 Conv2d per block, 8 channels, 8x8 input; medians of 3; 2 shared CPU cores).", "",
             "| graph nodes | symbolic_trace (s) | sparsify (s) | sparsify ms/node | ratio to trace | plan (s) |",
             "|---|---|---|---|---|---|"]
    for nodes, tt, ts, tp in rows:
        lines.append(f"| {nodes:,} | {tt:.3f} | {ts:.3f} | {1e3 * ts / nodes:.3f} | {ts / tt:.1f}x | {tp:.3f} |")
    lines += ["", f"Growth exponent between {n0:,} and {n1:,} nodes: sparsify time ∝ nodes^{slope:.2f}, "
              f"plan ∝ nodes^{slope_plan:.2f} (1.0 is linear). Load average at the end: "
              f"{os.getloadavg()[0]:.1f}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        try:
            with open(args.out) as f:
                old = f.read()
        except FileNotFoundError:
            old = ""
        i = old.find("\n## Scaling")
        if i >= 0:
            j = old.find("\n## ", i + 5)
            old = old[:i] + (old[j:] if j >= 0 else "")
        with open(args.out, "w") as f:
            f.write(old.rstrip("\n") + "\n" + text)


if __name__ == "__main__":
    main()
