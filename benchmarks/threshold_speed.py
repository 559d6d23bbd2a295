"""Global magnitude threshold per training step on ResNet-50 (25.5 M prunable weights).

Compares, in the same run and on the same weights, the exact linear-interpolated quantile by
(a) a full ``torch.sort`` (the baseline), (b) ``torch.kthvalue`` (``sparsify.core.threshold.quantile``,
the reference), (c) ``QuantileTracker`` (band selection reusing the previous step's threshold), and (d) the same
tracker over the layers' ``|W|`` as separate tensors, the way ST-3 and GMP call it (``|W|``
written into buffers kept across steps, no ``cat``; its time includes that ``abs`` pass).
Each "step" perturbs every weight by 1e-3 of its layer's std (an optimizer-sized move) and
advances the ratio along a cubic ramp of ``--ramp`` steps (from step ``--at`` on; ImageNet ST-3
ramps over 45 epochs = 225k steps, so 5000 is a fast ramp); every method must give the
identical threshold. Times are medians over the steps;
building the magnitude vector (``cat`` of ``|W|``) is timed separately, it is common to all.

    .venv/bin/python benchmarks/threshold_speed.py [--steps 8] [--ramp 5000] [--at 500] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from sparsify.core.schedules import cubic
from sparsify.core.threshold import QuantileTracker, _interpolate, quantile

from _report import write_json


def sort_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    s = torch.sort(values).values
    pos = (s.numel() - 1) * q
    k = int(pos)
    if pos == k or k + 1 >= s.numel():
        return s[k]
    return _interpolate(s[k], s[k + 1], pos - k)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ramp", type=int, default=5000, help="length of the cubic ramp in steps")
    ap.add_argument("--at", type=int, default=500, help="first measured step of the ramp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    n = sum(w.numel() for w in weights)
    print(f"resnet50: {len(weights)} Conv/Linear layers, {n:,} weights, {torch.get_num_threads()} threads")
    tracker, layer_tracker = QuantileTracker(), QuantileTracker()
    bufs = [torch.empty_like(w) for w in weights]
    times = {"cat |W|": [], "torch.sort": [], "kthvalue (quantile)": [], "band (QuantileTracker)": [],
             "band over layers (abs + band)": []}
    for step in range(args.steps):
        r = cubic(args.at + step, 0, args.ramp, 0.9)
        with torch.no_grad():
            for w in weights:  # an optimizer-sized move
                w.add_(torch.randn_like(w), alpha=1e-3 * float(w.std()))
        mags, t = timed(lambda: torch.cat([w.abs().reshape(-1) for w in weights]))
        times["cat |W|"].append(t)
        a, t = timed(sort_quantile, mags, r)
        times["torch.sort"].append(t)
        b, t = timed(quantile, mags, r)
        times["kthvalue (quantile)"].append(t)
        c, t = timed(tracker, mags, r)
        times["band (QuantileTracker)"].append(t)
        d, t = timed(lambda: layer_tracker([torch.abs(w, out=o) for w, o in zip(weights, bufs)], r))
        times["band over layers (abs + band)"].append(t)
        same = torch.equal(a, b) and torch.equal(b, c) and torch.equal(c, d)
        print(f"step {step}: ratio {r:.4f} tau {float(c):.6g} identical={same}  " +
              "  ".join(f"{k} {1000 * v[-1]:.0f} ms" for k, v in times.items()))
        if not same:
            raise SystemExit(f"thresholds differ at step {step}: sort {float(a)!r} kthvalue {float(b)!r} "
                             f"band {float(c)!r} band over layers {float(d)!r}")
    # the first band step has no previous threshold (cold start from a sample): report it apart
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    cold = times["band (QuantileTracker)"][0]
    print("\nmedian per step (steps 2..N):")
    for k, v in med.items():
        print(f"  {k:24s} {1000 * v:8.1f} ms")
    print(f"  band, first step (cold)  {1000 * cold:8.1f} ms")
    speedup = med["torch.sort"] / med["band (QuantileTracker)"]
    print(f"band vs torch.sort: {speedup:.1f}x faster (selection only); "
          f"with the cat: {(med['torch.sort'] + med['cat |W|']) / (med['band (QuantileTracker)'] + med['cat |W|']):.1f}x; "
          f"band vs kthvalue: {med['kthvalue (quantile)'] / med['band (QuantileTracker)']:.1f}x; "
          f"sort + cat vs band over layers: {(med['torch.sort'] + med['cat |W|']) / med['band over layers (abs + band)']:.1f}x")
    write_json(args.json, {"weights": n, "median_s": med, "cold_band_s": cold, "speedup_vs_sort": speedup})


if __name__ == "__main__":
    main()
