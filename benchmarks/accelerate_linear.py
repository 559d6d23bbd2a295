"""Sparse Linear layers on CPU: vit_b_16's 12 MLP blocks (768 -> 3072 -> 768, GELU) pruned to 90%
and 95% by ST-3 (global magnitude), finalized, then ``finalize(..., accelerate=True)`` (CSR/BSR
where it measures faster). Speedup of the Linear stack against the same stack dense, measured
in the same run, batch 1 and batch 8 (197 tokens per image), 2 threads.

    .venv/bin/python benchmarks/accelerate_linear.py [--rounds 20] [--json out.json]
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

sys.path.insert(0, os.path.dirname(__file__))
import sparsify  # noqa: E402
from passes import set_submodule  # noqa: E402
from sparsify.deploy.accelerate.gemm import PackCache, gemm  # noqa: E402
from _report import write_json  # noqa: E402
from _timing import add_interleaved_args, clock_of, interleaved, load_average  # noqa: E402


def vit_mlp_stack() -> nn.Sequential:
    """The MLP blocks of a (randomly initialised) vit_b_16, in order, as one Sequential."""
    vit = torchvision.models.vit_b_16()
    return nn.Sequential(*[layer.mlp for layer in vit.encoder.layers])


class OneDNNLinear(nn.Module):
    """Reference only: a dense Linear through the same oneDNN packed GEMM the patch-skipping conv
    uses, to show how much of a sparse speedup over ``nn.Linear`` the GEMM engine alone gives."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin, self.cache = lin, PackCache()

    def forward(self, x):
        return gemm(x.reshape(-1, x.shape[-1]), self.lin.weight, self.lin.bias, self.cache).reshape(
            *x.shape[:-1], self.lin.out_features)


def onednn_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            set_submodule(model, name, OneDNNLinear(m))
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_interleaved_args(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    results = []
    dense = vit_mlp_stack().eval()
    for sparsity in (0.9, 0.95):
        for batch in (1, 8):
            x = torch.randn(batch, 197, 768)
            m = sparsify.sparsify(dense, "st3", sparsity=sparsity, begin=0, end=0, fix=None, example_inputs=x,
                                  copy=True)
            final = sparsify.finalize(m)
            fast = sparsify.finalize(m, accelerate=True)
            paths = fast.acceleration.count()
            dense_onednn = onednn_copy(dense)
            t = interleaved({"dense": lambda: dense(x), "dense_onednn": lambda: dense_onednn(x),
                             "finalized": lambda: final(x), "accelerated": lambda: fast(x)}, rounds=args.rounds,
                            clock=clock_of(args.cpu_time))
            row = {"sparsity": sparsity, "batch": batch, "threads": args.threads,
                   "clock": "cpu" if args.cpu_time else "wall", "times_ms": t, "paths": paths, "load": load_average(),
                   "speedup_median": t["dense"]["median"] / t["accelerated"]["median"],
                   "speedup_min": t["dense"]["min"] / t["accelerated"]["min"],
                   "speedup_vs_onednn_dense_median": t["dense_onednn"]["median"] / t["accelerated"]["median"],
                   "speedup_vs_onednn_dense_min": t["dense_onednn"]["min"] / t["accelerated"]["min"]}
            results.append(row)
            print(f"sparsity {sparsity:.2f} batch {batch}: dense {t['dense']['median']:.1f} ms (min "
                  f"{t['dense']['min']:.1f}), accelerated {t['accelerated']['median']:.1f} ms (min "
                  f"{t['accelerated']['min']:.1f}) -> {row['speedup_median']:.2f}x median, {row['speedup_min']:.2f}x "
                  f"fastest rounds; vs oneDNN dense {t['dense_onednn']['median']:.1f} ms: "
                  f"{row['speedup_vs_onednn_dense_median']:.2f}x / {row['speedup_vs_onednn_dense_min']:.2f}x; "
                  f"paths {paths} (load {row['load']:.1f})", flush=True)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
