"""SAS layer forward+backward: this library's SASConv2d / SASLinear vs the official computation.

The official code (DensoITLab/sas_, sas_conv2d.py) builds an interleaved zeros tensor of twice the
input, writes |x|·[x>0] and |x|·[x<=0] into it and runs one wide conv. Ours (sparsify's
_SASFunction) writes relu(x) and relu(x) - x into a scratch buffer reused by every SAS layer (no
zeros tensor, no masks, no fresh allocation) and runs the same conv (depthwise: one narrow conv
per slot; strided 1x1: only the positions the conv reads), keeping only x for the backward and
recomputing the slots there (default recompute=True; "keep slots" keeps a copy instead). Also
timed, through plain autograd: two convs, and one conv over cat + blocked weight.

"wide conv only" is the official conv alone, forward+backward on a ready slot tensor: what any
formulation running the official conv must pay. official / (wide conv only) bounds the speedup
of such formulations; where it is below the 1.3x goal (compute-bound shapes) only a different
conv (depthwise per slot, strided 1x1 on the positions read) can get there.

All variants run in the same process, rounds interleaved, the minimum over rounds kept (the
machine is shared; the minimum is the least disturbed run). ``--clock cpu`` measures process CPU
time instead of wall time: with ``--threads 1`` it is nearly blind to other processes' load.
Memory: bytes of tensors autograd keeps for the backward (distinct storages, parameters
excluded), and the peak of memory allocated during one forward+backward (torch profiler, SAS
scratch buffers included: they are freed before the measured step).

    .venv/bin/python benchmarks/sas_conv.py [--reps 7] [--batch 8] [--threads N] [--clock cpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch
import torch.nn.functional as F

from sparsify.methods.sas import SASConv2d, SASLinear, release_workspaces

from _report import write_json
from _timing import add_clock_args, clock_from_args

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


def _wide(layer, proj):
    if isinstance(layer, SASLinear):
        return F.linear(proj, layer.weight, layer.bias)
    return F.conv2d(proj, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def official_forward(layer, x):
    return _wide(layer, official_projection(x))


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
    """Ours with ``recompute=False``: a copy of the slots is kept for the backward."""
    twin = copy.copy(layer)  # shares the parameters
    twin.sas_recompute = False
    return twin(x)


VARIANTS = {"official": official_forward, "ours": None, "ours keep slots": keep_slots_forward,
            "two convs": two_convs_forward, "cat": cat_forward}
FLOOR = "wide conv only"


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


def peak_bytes(step_fn) -> int:
    """Peak of bytes allocated (above the start) while ``step_fn()`` runs, from the torch profiler's
    memory events; SAS scratch buffers are released first so that they are counted."""
    release_workspaces()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    mem = sorted((e["ts"], e["args"]) for e in events if e.get("name") == "[memory]")
    if not mem:
        return 0
    # the profiler's running total does not restart with each profile: measure from the first event
    start = mem[0][1]["Total Allocated"] - mem[0][1]["Bytes"]
    return max(0, max(a["Total Allocated"] for _, a in mem) - start)


def step(fn, x, grad):
    x.grad = None
    out = fn(x)
    out.backward(grad)
    return out


def bench(name, cin, cout, hw, k, stride, groups, batch, reps, clock):
    torch.manual_seed(0)
    if hw is None:
        layer = SASLinear(cin, cout)
        x = torch.randn(batch * 8, cin, requires_grad=True)
    else:
        layer = SASConv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
        x = torch.randn(batch, cin, hw, hw, requires_grad=True)
    fns = {k: (layer if f is None else (lambda t, f=f: f(layer, t))) for k, f in VARIANTS.items()}
    ready = official_projection(x.detach()).requires_grad_(True)

    def floor(t):
        ready.grad = None
        return _wide(layer, ready)
    fns[FLOOR] = floor
    g = torch.randn_like(fns["official"](x).detach())
    ref = None
    err = {}
    for key, fn in fns.items():
        layer.weight.grad = None
        out = step(fn, x, g).detach()
        if key == FLOOR:
            continue
        res = (out, x.grad.clone(), layer.weight.grad.clone())
        ref = ref or res
        err[key] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(res, ref))
    t0 = clock()
    step(fns["official"], x, g)
    inner = max(1, int(0.05 / max(clock() - t0, 1e-6)))  # rounds of >= ~50 ms
    times = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = clock()
            for _ in range(inner):
                layer.weight.grad = None
                step(fn, x, g)
            times[key].append((clock() - t0) / inner)
    variants = [k for k in fns if k != FLOOR]
    mem = {k: saved_bytes(fns[k], x, layer.parameters()) for k in variants}
    peak = {}
    for k in variants:
        layer.weight.grad = None
        peak[k] = peak_bytes(lambda k=k: step(fns[k], x, g))
    best = {k: min(v) for k, v in times.items()}
    return {"layer": name, "input": list(x.shape), "ms": {k: 1e3 * v for k, v in best.items()},
            "speedup": best["official"] / best["ours"], "bound": best["official"] / best[FLOOR],
            "saved_MB": {k: v / 2**20 for k, v in mem.items()}, "peak_MB": {k: v / 2**20 for k, v in peak.items()},
            "max_rel_diff": err}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    add_clock_args(ap)
    ap.add_argument("--only", default=None, help="run the shapes whose name contains this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    clock = clock_from_args(args)
    load = os.getloadavg()[0]
    rows = [bench(*s, batch=args.batch, reps=args.reps, clock=clock) for s in SHAPES
            if args.only is None or args.only in s[0]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, min of {args.reps}, "
          f"{args.clock} clock, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| layer | input | official ms | ours ms | **ours vs official** | wide conv only ms | official / wide conv only "
          "| ours keep slots ms | two convs ms | cat ms "
          "| saved for backward MB: official / ours / keep slots / two convs / cat "
          "| peak MB: official / ours / keep slots / two convs / cat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms, mb, pk = r["ms"], r["saved_MB"], r["peak_MB"]
        print(f"| {r['layer']} | {'x'.join(map(str, r['input']))} | {ms['official']:.1f} | {ms['ours']:.1f} | "
              f"**{r['speedup']:.2f}x** | {ms[FLOOR]:.1f} | {r['bound']:.2f}x | {ms['ours keep slots']:.1f} | "
              f"{ms['two convs']:.1f} | {ms['cat']:.1f} | " + " / ".join(f"{mb[k]:.1f}" for k in VARIANTS) + " | "
              + " / ".join(f"{pk[k]:.1f}" for k in VARIANTS) + " |")
    print("max relative difference to the official outputs and gradients:",
          max(r["max_rel_diff"]["ours"] for r in rows))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
