"""How the direct sparse convolution splits its work over threads, measured without wall clock.

Every Conv2d of a torchvision model, magnitude-pruned per layer (or under one global threshold,
as ST-3 and global GMP prune), becomes a ``DirectSparseConv2d`` and runs on a random input of the
shape it sees in the model. Per layer:

* **work balance**: the kernel's split of the multiply-adds (taps x output positions) over the
  threads, busiest thread over the mean, for the split the kernel takes (``auto``) and for
  output channels only (``channels``);
* **time balance** and **overhead**: the CPU time each thread spends on its share (measured in
  the kernel with the thread's own CPU clock, so waiting for a core on a shared machine does not
  count): busiest over mean, and the sum over the threads against the same call on one thread
  (CPU time of the calling thread); fastest of ``--reps`` calls each.

``speedup bound`` = one-thread time / busiest thread's time: what the split allows the convs
(the padded-input copy, parallel on its own, not included).

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
    torch.set_num_threads(1)
    fast(x)
    t1 = min(_thread_time(fast, x) for _ in range(reps))
    row = {"one_thread_ms": 1e3 * t1}
    torch.set_num_threads(threads)
    for name, su in (("auto", -1), ("channels", 1)):
        split = fast.thread_split(x.shape, threads, su)
        torch.ops.sparsify_direct.profile(True, su)
        best = None
        for _ in range(reps + 1):
            fast(x)
            ns = torch.ops.sparsify_direct.profile(True, su)[:, 0].double() / 1e6
            best = ns if best is None else torch.minimum(best, ns)
        torch.ops.sparsify_direct.profile(False, -1)
        row[name] = {"units": int(split[:, 1].max() - split[:, 0].min()),
                     "spatial_groups": len({(int(a), int(b)) for a, b in split[:, :2].tolist()}),
                     "work_balance": balance(split[:, 4]), "computed_balance": balance(split[:, 5]),
                     "time_balance": balance(best),
                     "busy_ms": float(best.sum()), "busiest_ms": float(best.max()),
                     "overhead": float(best.sum()) / (1e3 * t1), "speedup_bound": 1e3 * t1 / float(best.max())}
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
    print(f"{'layer':22} {'shape':>16} {'1 thr ms':>8} | {'split':>9} {'work bal':>8} {'time bal':>8} "
          f"{'overhead':>8} {'bound':>6} | channels only: {'work bal':>8} {'time bal':>8} {'overhead':>8} {'bound':>6}")
    for name, conv, shape in conv_inputs(model, x):
        if conv.groups != 1 and conv.groups == conv.in_channels:
            continue  # depthwise: accelerate keeps most of them dense
        fast = DirectSparseConv2d.from_conv(conv)
        r = measure(fast, torch.randn(shape), args.threads, args.reps)
        r.update(layer=name, shape=list(shape), nnz=fast.nnz())
        rows.append(r)
        a, c = r["auto"], r["channels"]
        kind = "spatial" if a["spatial_groups"] == args.threads else ("channels" if a["spatial_groups"] == 1 else "both")
        print(f"{name:22} {'x'.join(map(str, shape[1:])):>16} {r['one_thread_ms']:8.3f} | {kind:>9} "
              f"{a['work_balance']:8.3f} {a['time_balance']:8.3f} {a['overhead']:8.3f} {a['speedup_bound']:5.2f}x | "
              f"{'':15} {c['work_balance']:8.3f} {c['time_balance']:8.3f} {c['overhead']:8.3f} {c['speedup_bound']:5.2f}x",
              flush=True)
    total = sum(r["one_thread_ms"] for r in rows)
    summary = {}
    for k in ("auto", "channels"):
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
