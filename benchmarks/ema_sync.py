"""Cost of ``sparsify.sync(ema, model)`` against the EMA update it follows, measured in the same
run: torch's ``AveragedModel`` with an EMA average of parameters and buffers
(``update_parameters``, the baseline), then ``sparsify.sync``, on a sparsified ResNet-50 per
recipe; and one training step of the same model for scale.

    python benchmarks/ema_sync.py                                   # resnet50, 4 recipes
    python benchmarks/ema_sync.py --model resnet18 --recipes gmp --rounds 10 --json out.json

The two calls alternate round by round (``_timing.interleaved``), so load hits both alike.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsify  # noqa: E402
from _report import write_json  # noqa: E402
from _timing import add_interleaved_args, clock_of, interleaved  # noqa: E402


def measure(model_name: str, recipe: str, batch: int, size: int, rounds: int, clock) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(getattr(torchvision.models, model_name)(), recipe, total_steps=100,
                                  example_inputs=(x[:1],))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01, momentum=0.9)

    def train_step():
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
            opt.zero_grad()
            loss.backward()
        opt.step()
        sparsify.step(model, loss)

    train_step()  # states and masks in their training shape before timing
    ms = interleaved({"update": lambda: ema.update_parameters(model), "sync": lambda: sparsify.sync(ema, model)},
                     rounds=rounds, clock=clock)
    step = interleaved({"train step": train_step}, rounds=max(2, rounds // 5), warmup=1, clock=clock)["train step"]
    return {"model": model_name, "recipe": recipe, "update_ms": ms["update"]["median"], "sync_ms": ms["sync"]["median"],
            "sync_over_update": ms["sync"]["median"] / ms["update"]["median"],
            "train_step_ms": step["median"], "sync_over_step": ms["sync"]["median"] / step["median"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--recipes", default="gmp,st3,dual,semi-structured")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--json", default=None)
    add_interleaved_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = clock_of(args.cpu_time)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'process CPU time' if args.cpu_time else 'wall clock'}; {args.model}, train step at batch {args.batch}, "
          f"{args.size}x{args.size}")
    print("| recipe | EMA update (ms) | sync (ms) | sync / update | train step (ms) | sync / step |")
    print("|---|---|---|---|---|---|")
    rows = []
    for recipe in args.recipes.split(","):
        r = measure(args.model, recipe, args.batch, args.size, args.rounds, clock)
        rows.append(r)
        print(f"| {recipe} | {r['update_ms']:.1f} | {r['sync_ms']:.1f} | {r['sync_over_update']:.2f} | "
              f"{r['train_step_ms']:.0f} | {100 * r['sync_over_step']:.1f}% |", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
