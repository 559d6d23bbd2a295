"""Semi-structured activation sparsity on CPU: ResNet-18 at 224x224 with s = 0.1 / 0.2 / 0.3 of
every non-1x1 conv's output positions masked (the built-in "semi-structured" recipe, masks
frozen), finalized, then ``finalize(..., accelerate=True)`` (patch-skipping convs where they
measure faster). End-to-end speedup against the dense ResNet-18 in the same run, batch 1 and 8,
2 threads, next to the ideal MAC ratio (dense MACs / MACs left; 1x1 convs and fc stay dense).

Three dense baselines: torchvision's model as users run it (NCHW, eval BatchNorm), the same in
channels-last memory, and the strongest dense deployment: channels-last with every BatchNorm
folded into its conv (``torch.fx.experimental.optimization.fuse``). The accelerated model runs
channels-last with BN folded everywhere (``accelerate`` folds it into the convs that stay dense
too), so the ratio against the last baseline is the part of the gain that comes from skipping
patches alone (plus the ReLUs the patch-skipping GEMMs fuse).

    .venv/bin/python benchmarks/accelerate_semistructured.py [--rounds 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, os.path.dirname(__file__))
import sparsify  # noqa: E402
from _report import write_json  # noqa: E402
from _timing import add_interleaved_args, clock_of, interleaved, load_average  # noqa: E402
from sparsify.methods.semistructured import PositionMask  # noqa: E402


def ideal_mac_ratio(final: nn.Module, x: torch.Tensor) -> float:
    """Dense Conv/Linear MACs over the MACs of the kept positions (masked convs only)."""
    macs = {}

    def hook(name):
        def record(mod, args, out):
            per_pos = mod.weight.numel() // (mod.groups if isinstance(mod, nn.Conv2d) else 1)
            positions = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else out.shape[:-1].numel() // out.shape[0]
            macs[name] = per_pos * positions
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in final.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        final(x[:1])
    for h in hooks:
        h.remove()
    kept = dict(macs)
    for n, m in final.named_modules():
        if isinstance(m, PositionMask) and n.endswith("_pmask"):
            conv = n[: -len("_pmask")]
            kept[conv] = macs[conv] * float((m.mask != 0).float().mean())
    return sum(macs.values()) / sum(kept.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_interleaved_args(ap)
    ap.add_argument("--sparsities", default="0.1,0.2,0.3")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    dense = torchvision.models.resnet18().eval()
    dense_cl = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    dense_cl.load_state_dict(dense.state_dict())
    dense_fold = fuse(copy.deepcopy(dense)).to(memory_format=torch.channels_last)
    results = []
    for s in [float(v) for v in args.sparsities.split(",")]:
        x1 = torch.randn(1, 3, 224, 224)
        m = sparsify.sparsify(dense, "semi-structured", sparsity=s, begin=0, end=0, example_inputs=x1, copy=True)
        final = sparsify.finalize(m)
        ideal = ideal_mac_ratio(final, x1)
        for batch in [int(v) for v in args.batches.split(",")]:
            x = torch.randn(batch, 3, 224, 224)
            xcl = x.contiguous(memory_format=torch.channels_last)
            fast = sparsify.finalize(m, x, accelerate=True)  # decisions timed at this batch size
            t = interleaved({"dense": lambda: dense(x), "dense_cl": lambda: dense_cl(xcl),
                             "dense_cl_folded": lambda: dense_fold(xcl), "finalized": lambda: final(x),
                             "accelerated": lambda: fast(x)}, rounds=args.rounds,
                            clock=clock_of(args.cpu_time))
            row = {"sparsity": s, "batch": batch, "threads": args.threads, "clock": "cpu" if args.cpu_time else "wall",
                   "ideal_mac_ratio": ideal, "times_ms": t,
                   "paths": fast.acceleration.count(), "load": load_average()}
            for stat in ("median", "min"):
                row[f"speedup_vs_dense_{stat}"] = t["dense"][stat] / t["accelerated"][stat]
                row[f"speedup_vs_dense_cl_{stat}"] = t["dense_cl"][stat] / t["accelerated"][stat]
                row[f"speedup_vs_dense_cl_folded_{stat}"] = t["dense_cl_folded"][stat] / t["accelerated"][stat]
            results.append(row)
            med = {k: v["median"] for k, v in t.items()}
            print(f"s={s:.1f} batch {batch}: ideal {ideal:.3f}x | medians: dense {med['dense']:.1f} ms, dense "
                  f"channels-last {med['dense_cl']:.1f} ms, dense channels-last BN-folded {med['dense_cl_folded']:.1f} ms,"
                  f" finalized {med['finalized']:.1f} ms, accelerated {med['accelerated']:.1f} ms | speedup (median /"
                  f" fastest rounds) vs dense {row['speedup_vs_dense_median']:.2f}x / {row['speedup_vs_dense_min']:.2f}x;"
                  f" vs channels-last {row['speedup_vs_dense_cl_median']:.2f}x / {row['speedup_vs_dense_cl_min']:.2f}x;"
                  f" vs channels-last BN-folded {row['speedup_vs_dense_cl_folded_median']:.2f}x /"
                  f" {row['speedup_vs_dense_cl_folded_min']:.2f}x; paths {row['paths']} (load {row['load']:.1f})",
                  flush=True)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
