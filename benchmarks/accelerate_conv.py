"""Weight-sparse CNNs on CPU: every Conv2d and the classifier magnitude-pruned per layer to the
given sparsity (random weights: speed does not depend on training), then
``accelerate(model, x)`` (direct sparse convs, CSR, BN folded, chosen per layer by measurement).
Compared in the same run, rounds interleaved (order reversed every other round), against

* ``dense``: the unpruned torchvision model in eager mode (NCHW, separate BatchNorms);
* ``best dense``: the same traced, every BN folded into its conv, weights and input channels-last.

Each ratio is the median over rounds of that round's dense time over its accelerated time
("paired"), with the 25th-75th percentile of those per-round ratios. Per layer: the speedup the
conversion measured for the chosen path against the dense conv (BN folded), and the ideal
(1 / density: the multiply ratio).

    PYTHONPATH=. .venv/bin/python benchmarks/accelerate_conv.py --model resnet18 --sparsity 0.9 --batch 1 \
        [--rounds 15] [--threads 2] [--cpu-time] [--layers] [--json out.json]

``--table`` runs the six ResNet rows of docs/performance.md's two-thread table in one process
(ResNet-18 and ResNet-50: 90% at batch 1 and 8, 95% at batch 1; ``--rounds`` default 7 there)
and prints them as a Markdown table: about two minutes on an idle 2-core machine; ``--all-rows``
adds 95% at batch 8.

``--block 4`` prunes every layer whose output channels it divides in blocks of 4 output channels
x 1 weight (the block's mean ``|W|`` decides, per layer; the ``block=[4, 1]`` of GMP), which the
direct conv runs four channels at a time (path ``direct-b4``). The unstructured model of the same
sparsity is then built too and timed in the same rounds (*unstructured*, and the ratio *vs
unstructured*); ``--layers`` prints both models' per-layer times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.fx as fx
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from sparsify.deploy.accelerate import accelerate  # noqa: E402
from _report import write_json  # noqa: E402
from _timing import clock_of, load_average  # noqa: E402


@torch.no_grad()
def prune_per_layer(model: nn.Module, sparsity: float, block: int = 1) -> nn.Module:
    """Zero the smallest-magnitude ``sparsity`` of every Conv2d and Linear weight: single weights,
    or with ``block`` > 1 whole blocks of ``block`` output channels x 1 weight by their mean
    ``|W|`` (a layer whose output channels ``block`` does not divide: single weights)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            bo = block if w.shape[0] % block == 0 else 1
            score = w.abs().reshape(w.shape[0] // bo, bo, -1).mean(1)
            k = int(sparsity * score.numel())
            if k:
                keep = score > score.flatten().kthvalue(k).values
                w.mul_(keep.repeat_interleave(bo, 0).reshape(w.shape))
    return model


@torch.no_grad()
def paired_rounds(fns: dict, rounds: int, warmup: int = 2, clock=time.perf_counter) -> dict[str, list[float]]:
    """Per-round times (ms) of each call, run in turn, the order reversed every other round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = clock()
            fns[k]()
            samples[k].append(1e3 * (clock() - t))
    return samples


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    r = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return {"median": statistics.median(r), "p25": q[0], "p75": q[2]}


def layer_rows(report) -> list[dict]:
    rows = []
    for r in report.layers:
        if r.sparsity is None or "dense" not in r.times_ms:
            continue
        best = r.times_ms.get(r.path, r.times_ms["dense"])
        rows.append({"layer": r.name, "kind": r.kind, "path": r.path, "sparsity": r.sparsity,
                     "dense_ms": r.times_ms["dense"], "chosen_ms": best,
                     "achieved": r.times_ms["dense"] / best, "ideal": 1 / max(1e-9, 1 - r.sparsity),
                     "direct_vs_dense": next((r.times_ms["dense"] / v for k, v in r.times_ms.items()
                                              if k.startswith("direct")), None)})
    return rows


TABLE = [("resnet18", 0.9, 1), ("resnet18", 0.9, 8), ("resnet18", 0.95, 1),
         ("resnet50", 0.9, 1), ("resnet50", 0.9, 8), ("resnet50", 0.95, 1)]
ALL_ROWS = TABLE[:3] + [("resnet18", 0.95, 8)] + TABLE[3:] + [("resnet50", 0.95, 8)]
NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2"}


def table(args) -> list[dict]:
    """The rows of TABLE with ``args``' threads, clock and rounds, printed as a Markdown table."""
    rows = []
    for model, sparsity, batch in (ALL_ROWS if args.all_rows else TABLE):
        args.model, args.sparsity, args.batch = model, sparsity, batch
        rows.append(run(args))
    print(f"\n{args.threads} thread(s), {'process CPU time' if args.cpu_time else 'wall clock'}, {args.rounds} "
          f"rounds, torch {torch.__version__}" + (f", blocks of {args.block} output channels" if args.block > 1 else "")
          + "\n")
    ratio = lambda v: f"**{v['median']:.2f}×** [{v['p25']:.2f}–{v['p75']:.2f}]"  # noqa: E731
    blk = args.block > 1
    print("| model | sparsity | batch | dense | best dense | " + ("unstructured | " if blk else "") + "accelerated | "
          "vs dense | vs best dense |" + (" vs unstructured |" if blk else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if blk else ""))
    for r in rows:
        m = r["median_ms"]
        print(f"| {NAMES[r['model']]} | {100 * r['sparsity']:.0f}% | {r['batch']} | {m['dense']:.1f} ms | "
              f"{m['best_dense']:.1f} ms | " + (f"{m['unstructured']:.1f} ms | " if blk else "")
              + f"{m['accelerated']:.1f} ms | {ratio(r['vs_dense'])} | {ratio(r['vs_best_dense'])} |"
              + (f" {ratio(r['vs_unstructured'])} |" if blk else ""))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "mobilenet_v2"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=None, help="default 15, 7 with --table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (steadier on a "
                    "loaded machine; use with --threads 1, where accelerate() decides by CPU time too)")
    ap.add_argument("--layers", action="store_true", help="print the per-layer table")
    ap.add_argument("--table", action="store_true", help="the six ResNet rows of the docs' table, one process")
    ap.add_argument("--all-rows", action="store_true", help="with --table: 95%% at batch 8 too (eight rows)")
    ap.add_argument("--block", type=int, default=1, help="prune blocks of this many output channels x 1 "
                    "(4: the direct conv's direct-b4 path) and compare with unstructured in the same rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (7 if args.table else 15)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = table(args) if args.table else run(args)
    write_json(args.json, rows)
    return rows


def run(args) -> dict:
    """One model, sparsity and batch: the timings, ratios and per-layer rows; prints a summary."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    xc = x.contiguous(memory_format=torch.channels_last)
    dense = getattr(torchvision.models, args.model)().eval()
    best = accelerate(fx.symbolic_trace(dense), xc, decide="never", channels_last=True)
    t0 = time.perf_counter()
    pruned = prune_per_layer(fx.symbolic_trace(getattr(torchvision.models, args.model)().eval()), args.sparsity,
                             args.block)
    fast = accelerate(pruned, x)
    convert_s = time.perf_counter() - t0
    fns = {"dense": lambda: dense(x), "best_dense": lambda: best(xc), "accelerated": lambda: fast(x)}
    if args.block > 1:  # the model pruned to the same sparsity without blocks
        unstructured = accelerate(prune_per_layer(fx.symbolic_trace(getattr(torchvision.models, args.model)().eval()),
                                                  args.sparsity), x)
        fns["unstructured"] = lambda: unstructured(x)
    s = paired_rounds(fns, args.rounds, clock=clock_of(args.cpu_time))
    med = {k: statistics.median(v) for k, v in s.items()}
    row = {"model": args.model, "sparsity": args.sparsity, "batch": args.batch, "size": args.size,
           "threads": args.threads, "clock": "cpu" if args.cpu_time else "wall", "rounds": args.rounds, "median_ms": med,
           "vs_dense": ratio_stats(s["dense"], s["accelerated"]),
           "vs_best_dense": ratio_stats(s["best_dense"], s["accelerated"]),
           "paths": fast.acceleration.count(), "convert_s": convert_s, "load": load_average(),
           "layers": layer_rows(fast.acceleration), "torch": torch.__version__, "block": args.block}
    if args.block > 1:
        row["vs_unstructured"] = ratio_stats(s["unstructured"], s["accelerated"])
        row["layers_unstructured"] = layer_rows(unstructured.acceleration)
    vd, vb = row["vs_dense"], row["vs_best_dense"]
    print(f"{args.model} s={args.sparsity} batch {args.batch}: dense {med['dense']:.1f} ms, best dense "
          f"{med['best_dense']:.1f} ms, accelerated {med['accelerated']:.1f} ms -> {vd['median']:.2f}x dense "
          f"[{vd['p25']:.2f}-{vd['p75']:.2f}], {vb['median']:.2f}x best dense [{vb['p25']:.2f}-{vb['p75']:.2f}]; "
          f"paths {row['paths']}; converted in {convert_s:.0f} s (load {row['load']:.1f})", flush=True)
    if args.block > 1:
        print(f"  vs unstructured ({med['unstructured']:.1f} ms): {row['vs_unstructured']['median']:.2f}x", flush=True)
    if args.layers:
        unstr = {r["layer"]: r for r in row.get("layers_unstructured", [])}
        print(f"{'layer':24} {'kind':14} {'path':9} {'sparsity':>8} {'dense ms':>9} {'chosen ms':>9} "
              f"{'achieved':>8} {'ideal':>6}" + ("  unstructured: path, ms, block gain" if unstr else ""))
        for r in row["layers"]:
            u = unstr.get(r["layer"])
            print(f"{r['layer']:24} {r['kind']:14} {r['path']:9} {100 * r['sparsity']:7.1f}% {r['dense_ms']:9.3f} "
                  f"{r['chosen_ms']:9.3f} {r['achieved']:7.2f}x {r['ideal']:5.1f}x"
                  + (f"  {u['path']:9} {u['chosen_ms']:9.3f} {u['chosen_ms'] / r['chosen_ms']:5.2f}x" if u else ""))
    return row


if __name__ == "__main__":
    main()
