"""How the direct sparse convolution splits its work over threads, measured without wall clock.

Every Conv2d of a torchvision model, magnitude-pruned per layer (or under one global threshold,
as ST-3 and global GMP prune), becomes a ``DirectSparseConv2d`` and runs on a random input of the
shape it sees in the model. Per layer:

* **work balance**: the kernel's split of the multiply-adds (taps x output positions) over the
  threads, busiest thread over the mean; **computed**: the same counting whole 64-wide tiles,
  as the kernel runs them;
* **time balance** and **overhead**: the CPU time each thread spends on its share (measured in
  the kernel with the thread's own CPU clock, so waiting for a core on a shared machine does not
  count): busiest over mean, and the sum over the threads against the same call on one thread
  (CPU time of the calling thread); fastest of ``--reps`` calls each.

``speedup bound`` = one-thread time / busiest thread's time: what the split allows the convs
(the padded-input copy, parallel on its own, not included). Each for the split the kernel
chooses, and the last two also for the split forced to tiles (and images) only and to output
channels only.

    PYTHONPATH=. python benchmarks/direct_conv_threads.py --model resnet18 --sparsity 0.9 --batch 1 [--global]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from sparsify.deploy.accelerate import DirectSparseConv2d, direct_available  # noqa: E402
from accelerate_conv import prune_per_layer  # noqa: E402
from _report import write_json  # noqa: E402


@torch.no_grad()
def prune_global(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the smallest-magnitude ``sparsity`` of all Conv2d and Linear weights together."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flat = torch.cat([w.abs().flatten() for w in ws])
    t = flat.kthvalue(int(sparsity * flat.numel())).values
    for w in ws:
        w.mul_(w.abs() > t)
    return model


@torch.no_grad()
def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d, torch.Size]]:
    found = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: found.append((n, m, a[0].shape)))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model(x)
    for h in hooks:
        h.remove()
    return found


def balance(work: torch.Tensor) -> float:
    work = work.double()
    return float(work.max() / work.mean()) if work.sum() > 0 else 1.0


@torch.no_grad()
def measure(fast: DirectSparseConv2d, x: torch.Tensor, threads: int, reps: int) -> dict:
    """One thread and each split in turn, the fastest of ``reps``; each timed call follows an
    untimed one of the same kind, so its caches hold what that split put there."""
    splits = {}
    for name, su in (("auto", -1), ("tiles", threads), ("channels", 1)):
        try:
            splits[name] = (su, fast.thread_split(x.shape, threads, su))
        except RuntimeError:  # fewer tiles than threads
            pass
    t1, best = float("inf"), {}
    for rep in range(reps + 1):
        torch.set_num_threads(1)
        fast(x)
        t = _thread_time(fast, x)
        t1 = min(t1, t) if rep else t1  # rep 0 warms up
        torch.set_num_threads(threads)
        for name, (su, _) in splits.items():
            torch.ops.sparsify_direct.profile(True, su)
            fast(x)
            fast(x)
            ns = torch.ops.sparsify_direct.profile(False, -1)[:, 0].double() / 1e6
            best[name] = ns if not rep else torch.minimum(best[name], ns)
    row = {"one_thread_ms": 1e3 * t1}
    for name in ("auto", "tiles", "channels"):
        if name not in splits:
            row[name] = None
            continue
        split, b = splits[name][1], best[name]
        row[name] = {"units": int(split[:, 1].max() - split[:, 0].min()),
                     "spatial_groups": len({(int(a), int(c)) for a, c in split[:, :2].tolist()}),
                     "work_balance": balance(split[:, 4]), "computed_balance": balance(split[:, 5]),
                     "time_balance": balance(b), "busy_ms": float(b.sum()), "busiest_ms": float(b.max()),
                     "overhead": float(b.sum()) / (1e3 * t1), "speedup_bound": 1e3 * t1 / float(b.max())}
    return row


def _thread_time(fast, x) -> float:
    t = time.thread_time()
    fast(x)
    return time.thread_time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "mobilenet_v2"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--global", dest="global_", action="store_true", help="one global threshold (ST-3, global GMP)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if direct_available() is not None:
        sys.exit(f"the direct sparse conv is not available: {direct_available()}")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    (prune_global if args.global_ else prune_per_layer)(model, args.sparsity)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    print(f"{args.model}, {100 * args.sparsity:.0f}% ({'global' if args.global_ else 'per layer'}), batch "
          f"{args.batch}, {args.threads} threads, torch {torch.__version__}; CPU times, fastest of {args.reps}")
    print(f"{'layer':22} {'input':>11} {'1 thr ms':>8} | {'split':>8} {'work bal':>8} {'computed':>8} "
          f"{'time bal':>8} {'overhead':>8} {'bound':>6} | overhead, bound: tiles only | channels only")
    for name, conv, shape in conv_inputs(model, x):
        if conv.groups != 1 and conv.groups == conv.in_channels:
            continue  # depthwise: accelerate keeps most of them dense
        fast = DirectSparseConv2d.from_conv(conv)
        r = measure(fast, torch.randn(shape), args.threads, args.reps)
        r.update(layer=name, shape=list(shape), nnz=fast.nnz())
        rows.append(r)
        a = r["auto"]
        kind = "tiles" if a["spatial_groups"] == args.threads else ("channels" if a["spatial_groups"] == 1 else "both")
        other = " | ".join("       n/a      " if r[k] is None else f"{r[k]['overhead']:6.3f} {r[k]['speedup_bound']:5.2f}x"
                           for k in ("tiles", "channels"))
        print(f"{name:22} {'x'.join(map(str, shape[1:])):>11} {r['one_thread_ms']:8.3f} | {kind:>8} "
              f"{a['work_balance']:8.3f} {a['computed_balance']:8.3f} {a['time_balance']:8.3f} {a['overhead']:8.3f} "
              f"{a['speedup_bound']:5.2f}x | {other}", flush=True)
    total = sum(r["one_thread_ms"] for r in rows)
    summary = {}
    for k in ("auto", "tiles", "channels"):
        if any(r[k] is None for r in rows):
            continue
        busiest = sum(r[k]["busiest_ms"] for r in rows)
        summary[k] = {"one_thread_ms": total, "busy_ms": sum(r[k]["busy_ms"] for r in rows), "busiest_ms": busiest,
                      "overhead": sum(r[k]["busy_ms"] for r in rows) / total, "speedup_bound": total / busiest,
                      "worst_work_balance": max(r[k]["work_balance"] for r in rows)}
        s = summary[k]
        print(f"all convs, split {k}: one thread {total:.1f} ms; busy {s['busy_ms']:.1f} ms over the threads "
              f"(overhead {s['overhead']:.3f}); busiest thread {busiest:.1f} ms -> speedup bound "
              f"{s['speedup_bound']:.2f}x; worst work balance {s['worst_work_balance']:.3f}")
    write_json(args.json, {"args": vars(args), "layers": rows, "summary": summary, "torch": torch.__version__})
    return summary


if __name__ == "__main__":
    main()
