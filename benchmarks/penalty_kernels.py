"""Cost of the activation penalty alone: the kernels vs the plain formula, on ResNet-18's maps.

Forward + backward of ``λ·mean ρ_a(x)`` (Transformed-ℓ1) over the 17 ReLU-output shapes of a
ResNet-18 training step (batch ``--batch``, ``--size``² images), three ways in the same run,
repeats interleaved: ``plain`` = autograd through ``(1+a)|x|/(a+|x|)``; ``previous`` = the
custom autograd function these kernels replaced (commit 476b313: whole-map temporaries, 3 in
the forward and about 7 in the backward); ``kernels`` =
``penalty_value`` (sparsify/methods/penalty_kernels.py) with ``nonneg=True`` as the ReLU
placement uses; ``kernels, signed`` = the same without the ≥ 0 promise. Minimum and median over
``--reps``; ``--clock cpu --threads 1`` is the robust choice on a shared machine.

    python benchmarks/penalty_kernels.py --batch 32 --size 112 --reps 9 --clock cpu --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from sparsify.methods.regularizers import penalty_value
from _timing import add_clock_args, clock_from_args


class _Previous(torch.autograd.Function):
    """The implementation before the kernels, kept here as the baseline."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.save_for_backward(x)
        ctx.a = a
        t = x.float().abs()
        return (t / (t + a)).sum() * (1.0 + a)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        d = ctx.a + x.float().abs()
        return ((ctx.a * (1.0 + ctx.a)) * torch.sign(x.float()) / (d * d) * grad).to(x.dtype), None


def relu_shapes(batch: int, size: int) -> list[tuple[int, ...]]:
    s = size // 2  # stem conv, stride 2
    shapes = [(batch, 64, s, s)]
    s = (s + 1) // 2  # max pool
    for i, c in enumerate((64, 128, 256, 512)):
        if i:
            s = (s + 1) // 2
        shapes += [(batch, c, s, s)] * 4  # 2 BasicBlocks x 2 ReLU calls
    return shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--reps", type=int, default=9)
    add_clock_args(ap)
    args = ap.parse_args()
    clock = clock_from_args(args)
    torch.manual_seed(0)
    xs = [torch.relu(torch.randn(s)).requires_grad_() for s in relu_shapes(args.batch, args.size)]
    lam, a = 0.01, 1.0

    def plain(x):
        t = x.abs()
        return lam * ((1 + a) * t / (a + t)).mean()

    variants = {"plain": plain,
                "previous": lambda x: lam * (_Previous.apply(x, a) / x.numel()),
                "kernels": lambda x: penalty_value(x, "tl1", a, "mean", weight=lam, nonneg=True),
                "kernels, signed": lambda x: penalty_value(x, "tl1", a, "mean", weight=lam)}
    fwd = {}
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, f in variants.items():
            t0 = clock()
            p = torch.stack([f(x) for x in xs]).sum()
            t1 = clock()
            torch.autograd.grad(p, xs)
            times[k].append(clock() - t0)
            fwd.setdefault(k, []).append(t1 - t0)
    n = sum(x.numel() for x in xs)
    print(f"TL1 penalty, forward + backward over {len(xs)} maps ({n / 1e6:.1f} M elements), "
          f"{torch.get_num_threads()} threads, {args.clock} clock, load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':18} {'min ms':>8} {'median ms':>10} {'forward min ms':>15}")
    for k in variants:
        print(f"{k:18} {min(times[k]) * 1e3:8.1f} {statistics.median(times[k]) * 1e3:10.1f} "
              f"{min(fwd[k]) * 1e3:15.1f}")


if __name__ == "__main__":
    main()
