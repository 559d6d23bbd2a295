"""Training-step time of the weight methods vs dense ResNet-18 (CPU, same run, interleaved).

One step = forward, backward, SGD step, ``sparsify.step``. Each method is measured in its
costliest phase: ST-3 and GMP at their 90% target with thresholds, masks (and ST-3's scales)
recomputed after every step (GMP: every 100 steps, the recipe's default Δt as in Zhu & Gupta,
and every step in the "every step" variants), as between ``end`` and ``fix`` (a ramp step costs the same; the
benchmark once used a 10**6-step ramp, which kept the sparsity near 0 and the threshold at the
bottom of the distribution), STR (per-layer and global thresholds, learned: always the same
cost), N:M before its fix (mask recomputed every step, straight-through backward). Variants are interleaved round-robin
(the order reversed every other round) so load changes hit all alike; reported per variant: the
median step and its ratio to dense, the paired ratio (median over rounds of the variant's round
median over dense's in the same round) and the fastest step.

    .venv/bin/python benchmarks/train_step_weight.py --batch 32 --size 112 --steps 4 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import sparsify

HOLD = dict(begin=0, end=0)  # at the target from step 0; thresholds keep being recomputed (no fix)
VARIANTS = {
    "dense": None,
    "st3": ("st3", dict(fix=None, **HOLD)),
    "st3-sigma": ("st3-sigma", dict(fix=None, **HOLD)),
    "str": ("str", {}),
    "str-global": ("str-global", {}),
    "gmp": ("gmp", dict(fix=10 ** 6, **HOLD)),  # masks re-selected every 100 steps (Zhu & Gupta's Δt)
    "gmp (layer)": ("gmp", dict(fix=10 ** 6, scope="layer", **HOLD)),
    "gmp, every step": ("gmp", dict(fix=10 ** 6, frequency=1, **HOLD)),
    "gmp (layer), every step": ("gmp", dict(fix=10 ** 6, scope="layer", frequency=1, **HOLD)),
    "nm-2-4": ("nm-2-4", dict(begin=0, fix=None)),
}


def make(variant: str, x):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    spec = VARIANTS[variant]
    if spec is None:
        return net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4), False
    recipe, kw = spec
    m = sparsify.sparsify(net, recipe, example_inputs=x[:1], **kw)
    return m, torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-3, momentum=0.9), True


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process)


def step_times(model, opt, is_sparse, x, y, steps):
    model.train()
    times = []
    for _ in range(steps):
        t0 = CLOCK()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if is_sparse:
            sparsify.step(model)
        times.append(CLOCK() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="variants to run (dense is always included)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU seconds of this process, less disturbed by other processes on a "
                         "shared machine (use with --threads 1: idle OpenMP threads spin)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["dense"] + [v for v in VARIANTS if v != "dense" and (args.only is None or v in args.only)]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    built = {v: make(v, x) for v in names}
    for v in names:  # warm-up: allocator, kernels, the first (cold) threshold search
        step_times(*built[v], x, y, 1)
    times = {v: [] for v in names}
    rounds = {v: [] for v in names}  # each round's median, for the paired ratio
    for r in range(args.rounds):
        # the order alternates so that neither variant always follows the other
        for v in (names if r % 2 == 0 else names[::-1]):
            ts = step_times(*built[v], x, y, args.steps)
            times[v] += ts
            rounds[v].append(statistics.median(ts))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {statistics.median(t):.3f}s" for v, t in times.items()),
              flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    best = {v: min(t) for v, t in times.items()}  # least disturbed by other processes
    print(f"\nResNet-18, batch {args.batch}, {args.size}x{args.size}, CPU, {torch.get_num_threads()} threads, "
          f"{args.clock} clock; median of {args.rounds * args.steps} steps")
    # paired: the median over rounds of (variant / dense in the same round); load that changes
    # between rounds cancels out, which makes it the steadiest of the three on a shared machine
    paired = {v: statistics.median(a / b for a, b in zip(rounds[v], rounds["dense"])) for v in names}
    print(f"{'variant':24s} {'step (s)':>9s} {'vs dense':>9s} {'paired':>9s} {'fastest':>9s} {'vs dense':>9s}")
    for v in names:
        print(f"{v:24s} {med[v]:9.3f} {med[v] / med['dense']:9.3f} {paired[v]:9.3f} {best[v]:9.3f} "
              f"{best[v] / best['dense']:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": med, "ratio": {v: med[v] / med["dense"] for v in names},
                       "paired_ratio": paired,
                       "fastest_s": best, "fastest_ratio": {v: best[v] / best["dense"] for v in names}},
                      f, indent=2)


if __name__ == "__main__":
    main()
