"""What a training step keeps for its backward and how long it takes, eager against
``torch.compile``, per recipe, as ratios to the dense model in the same mode and run.

    .venv/bin/python benchmarks/compile_saved.py [--recipes dense sas gmp] [--backend inductor]

Saved bytes are the distinct storages autograd keeps for the backward (seen through
``torch.autograd.graph.saved_tensors_hooks``, which compiled graphs honour too): SAS's own kernel
keeps only each layer's input and recomputes its slots, while under compile SAS runs plain ops
and the compiler's partitioner decides what to keep (docs/compile.md). Times are the median of
``--steps`` steps after two warm-up steps (compiling). CPU inductor builds C++: about a minute per
model on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import sparsify

RECIPES = ["dense", "gmp", "st3", "nm-2-4", "sas", "sas-m4", "semi-structured", "tl1"]


def saved_bytes_and_time(model, x, y, steps: int) -> tuple[int, float]:
    """Bytes of the distinct storages saved for backward in one step; median step time (s)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()  # CPU and GPU storages alike
        return t

    def one_step(hooked: bool) -> float:
        seen.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if hooked else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # timed without the hooks: a compiled graph run under saved-tensor hooks takes another path
    times = [one_step(False) for _ in range(steps + 2)][2:]
    one_step(True)
    return sum(seen.values()), statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="e.g. cuda (times then synchronize the device)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    where = torch.cuda.get_device_name() if x.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"resnet18, batch {args.batch} at {args.size}x{args.size}, train mode, torch {torch.__version__}, "
          f"{where}; compiled: backend {args.backend}\n")
    print("| recipe | saved eager (MiB) | saved compiled (MiB) | x dense eager | x dense compiled | "
          "step eager (ms) | step compiled (ms) | x dense eager | x dense compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for recipe in ["dense"] + [r for r in args.recipes if r != "dense"]:
        row = []
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            torch._dynamo.reset()
            model = torchvision.models.resnet18(num_classes=10).to(args.device)
            if recipe != "dense":
                model = sparsify.sparsify(model, recipe, total_steps=100, example_inputs=x[:1])
            run = model if mode == "eager" else torch.compile(model, backend=args.backend)
            row.append(saved_bytes_and_time(run, x, y, args.steps))
        if base is None:
            base = row
        (be, te), (bc, tc) = row
        print(f"| {recipe} | {be / 2**20:.1f} | {bc / 2**20:.1f} | {be / base[0][0]:.2f} | {bc / base[1][0]:.2f} | "
              f"{1e3 * te:.0f} | {1e3 * tc:.0f} | {te / base[0][1]:.2f} | {tc / base[1][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
