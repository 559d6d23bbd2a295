"""Training-step time of the activation methods vs dense ResNet-18 (same run, interleaved).

One step = forward, ``sparsify.penalty``, backward, SGD step, ``sparsify.step``. Variants:
dense (the plain torchvision model), ``tl1`` (17 regularizer nodes), ``semi-structured``
(17 position masks, measured during the ramp: a fresh score map and 17 masks every step, the
costliest phase) and ``semi-structured`` frozen. Repeats are interleaved round-robin so load
changes hit every variant alike; the median per variant is reported with its ratio to dense.

    python benchmarks/train_step_activation.py --batch 16 --size 112 --steps 12 --rounds 5

On a loaded machine wall time mostly measures the other jobs; ``--clock cpu --threads 1`` times
each step by this process's CPU time instead (one thread, so no time is spent waiting on a
descheduled sibling thread), which other jobs inflate far less. ``--variants dense tl1`` runs a
subset (dense is always included: it is the baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import sparsify
from _timing import add_clock_args, clock_from_args


VARIANTS = ["dense", "tl1", "semi-structured (ramp)", "semi-structured (frozen)"]


def make(variant: str, x):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=100)
    if variant == "dense":
        return net, False
    if variant == "tl1":
        return sparsify.sparsify(net, "tl1", example_inputs=x[:1]), True
    if variant == "semi-structured (ramp)":
        return sparsify.sparsify(net, "semi-structured", example_inputs=x[:1], begin=0, end=10 ** 9), True
    if variant == "semi-structured (frozen)":
        return sparsify.sparsify(net, "semi-structured", example_inputs=x[:1], begin=0, end=0), True
    raise ValueError(variant)


def run(model, is_sparse, x, y, steps, clock=time.perf_counter):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for _ in range(steps):
        t0 = clock()
        loss = F.cross_entropy(model(x), y)
        if is_sparse:
            loss = loss + sparsify.penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if is_sparse:
            sparsify.step(model, loss=loss)
        times.append(clock() - t0)
    return statistics.median(times[1:])  # the first step warms the allocator and kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    add_clock_args(ap)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    clock = clock_from_args(args)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 100, (args.batch,))
    variants = ["dense"] + [v for v in args.variants if v != "dense"]
    models = {v: make(v, x) for v in variants}
    samples = {v: [] for v in variants}
    load_start = os.getloadavg()[0]
    for i in range(args.rounds):
        # the order alternates so that neither variant always follows the other
        for v in (variants if i % 2 == 0 else variants[::-1]):
            samples[v].append(run(*models[v], x, y, args.steps, clock))
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{v} {samples[v][-1]:.4f}s" for v in variants),
              file=sys.stderr, flush=True)
    med = {v: statistics.median(s) for v, s in samples.items()}
    out = {"batch": args.batch, "size": args.size, "threads": torch.get_num_threads(), "clock": args.clock,
           "load_average": {"start": load_start, "end": os.getloadavg()[0]},
           "seconds_per_step": med, "ratio_to_dense": {v: med[v] / med["dense"] for v in variants},
           "spread": {v: (min(s) / med["dense"], max(s) / med["dense"]) for v, s in samples.items()},
           # median over rounds of (variant / dense in the same round): load changes between
           # rounds cancel out
           "paired_ratio": {v: statistics.median(a / b for a, b in zip(samples[v], samples["dense"]))
                            for v in variants}}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"ResNet-18 training step, batch {args.batch}, {args.size}x{args.size}, {out['threads']} threads, "
          f"median of {args.rounds} interleaved rounds x {args.steps - 1} steps, {args.clock} clock, "
          f"load average {load_start:.2f} at the start, {out['load_average']['end']:.2f} at the end")
    print(f"{'variant':28} {'s/step':>8} {'vs dense':>9} {'paired':>7}  (min-max of round medians)")
    for v in variants:
        lo, hi = out["spread"][v]
        print(f"{v:28} {med[v]:8.4f} {out['ratio_to_dense'][v]:9.3f} {out['paired_ratio'][v]:7.3f}  "
              f"({lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()
