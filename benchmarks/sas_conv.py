"""SAS layer forward+backward: this library's SASConv2d / SASLinear vs the official computation.

The official code (DensoITLab/sas_, sas_conv2d.py) builds an interleaved zeros tensor of twice the
input, writes |x|·[x>0] and |x|·[x<=0] into it and runs one wide conv. Ours runs one conv over the
blocked projection [relu(x) | relu(-x)] with a blocked view of the same weight, saving only x for
the backward and recomputing the projection there. Both are timed in the same run, interleaved
(ABAB...), and the minimum over repetitions is kept (the machine is shared; the minimum is the
least disturbed run). Memory: bytes of tensors autograd keeps for the backward (distinct storages,
parameters excluded), the term that grows with depth and batch in training.

    .venv/bin/python benchmarks/sas_conv.py [--reps 7] [--batch 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from sparsify.methods.sas import SASConv2d, SASLinear

# (name, cin, cout, spatial, kernel, stride, groups): ResNet-18/50, MobileNetV2 shapes at 224x224
SHAPES = [
    ("r18 layer1 3x3", 64, 64, 56, 3, 1, 1),
    ("r18 layer2 3x3", 128, 128, 28, 3, 1, 1),
    ("r18 layer3 3x3", 256, 256, 14, 3, 1, 1),
    ("r18 layer4 3x3", 512, 512, 7, 3, 1, 1),
    ("r18 downsample 1x1/2", 64, 128, 56, 1, 2, 1),
    ("r50 1x1 256->64", 256, 64, 56, 1, 1, 1),
    ("mbv2 depthwise 3x3", 144, 144, 56, 3, 1, 144),
    ("fc 512->1000", 512, 1000, None, None, None, None),
]


def official_projection(x):
    """sas_conv2d.py SAS_proj (M = 2) for NCHW or NC inputs."""
    shape = list(x.shape)
    proj = torch.zeros(shape[:2] + [2] + shape[2:], dtype=x.dtype, device=x.device)
    y = x.abs()
    with torch.no_grad():
        sgn = x > 0
    proj[:, :, 0] = y * sgn.float()
    proj[:, :, 1] = y * (1.0 - sgn.float())
    return proj.flatten(1, 2)


def official_forward(layer, x):
    proj = official_projection(x)
    if isinstance(layer, SASLinear):
        return F.linear(proj, layer.weight, layer.bias)
    return F.conv2d(proj, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def saved_bytes(fn, x, params=()):
    """Bytes of distinct storages autograd saves for the backward of ``fn(x)``, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(seen.values())


def step(fn, x, grad):
    x.grad = None
    out = fn(x)
    out.backward(grad)
    return out


def bench(name, cin, cout, hw, k, stride, groups, batch, reps):
    torch.manual_seed(0)
    if hw is None:
        layer = SASLinear(cin, cout)
        x = torch.randn(batch * 8, cin, requires_grad=True)
    else:
        layer = SASConv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
        x = torch.randn(batch, cin, hw, hw, requires_grad=True)
    ours = layer
    official = lambda t: official_forward(layer, t)  # noqa: E731
    g = torch.randn_like(official(x).detach())
    out_o = step(official, x, g).detach()
    gx_o, gw_o = x.grad.clone(), layer.weight.grad.clone()
    layer.weight.grad = None
    out_s = step(ours, x, g).detach()
    gx_s, gw_s = x.grad.clone(), layer.weight.grad.clone()
    err = max(float((out_s - out_o).abs().max() / out_o.abs().max()),
              float((gx_s - gx_o).abs().max() / gx_o.abs().max()),
              float((gw_s - gw_o).abs().max() / gw_o.abs().max()))
    times = {"official": [], "ours": []}
    for _ in range(reps):
        for key, fn in (("official", official), ("ours", ours)):
            layer.weight.grad = None
            t0 = time.perf_counter()
            step(fn, x, g)
            times[key].append(time.perf_counter() - t0)
    mem = {k: saved_bytes(fn, x, layer.parameters()) for k, fn in (("official", official), ("ours", ours))}
    t_o, t_s = min(times["official"]), min(times["ours"])
    return {"layer": name, "input": list(x.shape), "official_ms": 1e3 * t_o, "ours_ms": 1e3 * t_s,
            "speedup": t_o / t_s, "official_saved_MB": mem["official"] / 2**20, "ours_saved_MB": mem["ours"] / 2**20,
            "max_rel_diff": err}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [bench(*s, batch=args.batch, reps=args.reps) for s in SHAPES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, min of {args.reps}")
    print("| layer | input | official ms | ours ms | speedup | saved for backward, official → ours (MB) | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {'x'.join(map(str, r['input']))} | {r['official_ms']:.1f} | {r['ours_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['official_saved_MB']:.1f} → {r['ours_saved_MB']:.1f} | {r['max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
