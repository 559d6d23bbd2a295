"""SAS layer forward+backward: this library's SASConv2d / SASLinear vs the official computation.

The official code (DensoITLab/sas_, sas_conv2d.py) builds an interleaved zeros tensor of twice the
input, writes |x|·[x>0] and |x|·[x<=0] into it and runs one wide conv. Ours (sparsify's
_SASFunction) writes relu(x), relu(-x) into one interleaved buffer (no zeros tensor, no masks) and
runs one conv (depthwise: one narrow conv per slot), keeping only x for the backward (default
recompute=True; "keep slots" keeps the slots instead). Also timed: two convs, and one conv over
cat + blocked weight, through plain autograd. All are timed in the same run, interleaved, and the
minimum over repetitions is kept (the machine is shared; the minimum is the least disturbed run).
Memory: bytes of tensors autograd keeps for the backward (distinct storages,
parameters excluded), the term that grows with depth and batch in training.

    .venv/bin/python benchmarks/sas_conv.py [--reps 7] [--batch 8] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
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


def _conv_kw(layer):
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def two_convs_forward(layer, x):
    """Alternative 1: conv(relu(x), W[:, 0::2]) + conv(relu(-x), W[:, 1::2]), plain autograd."""
    if isinstance(layer, SASLinear):
        return F.linear(x.relu(), layer.weight[:, 0::2], layer.bias) + F.linear((-x).relu(), layer.weight[:, 1::2])
    kw = _conv_kw(layer)
    return F.conv2d(x.relu(), layer.weight[:, 0::2], layer.bias, **kw) + F.conv2d((-x).relu(), layer.weight[:, 1::2], None, **kw)


def cat_forward(layer, x):
    """Alternative 2: one conv over cat([relu(x), relu(-x)]) (per group) with a blocked weight view."""
    w = layer.weight
    blocked = w.reshape(w.shape[0], w.shape[1] // 2, 2, *w.shape[2:]).transpose(1, 2).reshape(w.shape)
    if isinstance(layer, SASLinear):
        return F.linear(torch.cat([x.relu(), (-x).relu()], -1), blocked, layer.bias)
    g = layer.groups
    xs = x.reshape(x.shape[0], g, x.shape[1] // g, *x.shape[2:])
    buf = torch.stack([xs.relu(), (-xs).relu()], 2).reshape(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    return F.conv2d(buf, blocked, layer.bias, **_conv_kw(layer))


def keep_slots_forward(layer, x):
    """Ours with ``recompute=False``: the slots are kept for the backward."""
    twin = copy.copy(layer)  # shares the parameters
    twin.sas_recompute = False
    return twin(x)


VARIANTS = {"official": official_forward, "ours": None, "ours keep slots": keep_slots_forward,
            "two convs": two_convs_forward, "cat": cat_forward}


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
    fns = {k: (layer if f is None else (lambda t, f=f: f(layer, t))) for k, f in VARIANTS.items()}
    g = torch.randn_like(fns["official"](x).detach())
    ref = None
    err = {}
    for key, fn in fns.items():
        layer.weight.grad = None
        out = step(fn, x, g).detach()
        res = (out, x.grad.clone(), layer.weight.grad.clone())
        ref = ref or res
        err[key] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(res, ref))
    t0 = time.perf_counter()
    step(fns["official"], x, g)
    inner = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))  # rounds of >= ~50 ms
    times = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                layer.weight.grad = None
                step(fn, x, g)
            times[key].append((time.perf_counter() - t0) / inner)
    mem = {k: saved_bytes(fn, x, layer.parameters()) for k, fn in fns.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"layer": name, "input": list(x.shape), "ms": {k: 1e3 * v for k, v in best.items()},
            "speedup": best["official"] / best["ours"], "saved_MB": {k: v / 2**20 for k, v in mem.items()},
            "max_rel_diff": err}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(*s, batch=args.batch, reps=args.reps) for s in SHAPES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, min of {args.reps}")
    print("| layer | input | official ms | ours ms | ours vs official | ours keep slots ms | two convs ms | cat ms "
          "| saved for backward MB: official / ours / ours keep slots / two convs / cat |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms, mb = r["ms"], r["saved_MB"]
        print(f"| {r['layer']} | {'x'.join(map(str, r['input']))} | {ms['official']:.1f} | {ms['ours']:.1f} | "
              f"{r['speedup']:.2f}x | {ms['ours keep slots']:.1f} | {ms['two convs']:.1f} | {ms['cat']:.1f} | "
              + " / ".join(f"{mb[k]:.1f}" for k in VARIANTS) + " |")
    print("max relative difference to the official outputs and gradients:",
          max(r["max_rel_diff"]["ours"] for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
