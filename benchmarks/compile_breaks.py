"""Graph breaks of sparsified models under torch.compile, per built-in recipe.

    .venv/bin/python benchmarks/compile_breaks.py [--model resnet18] [--out docs/compile_breaks.md]

Uses ``torch._dynamo.explain`` (no inductor compile, so it is quick) on the training-mode forward.
Prints a markdown table: graphs, breaks, and each distinct break reason with where it happens.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings

import torch
import torch._dynamo as dynamo
import torchvision

import sparsify


def explain(model, x):
    dynamo.reset()
    ex = dynamo.explain(model)(x)
    reasons = collections.Counter()
    for b in ex.break_reasons:
        where = ""
        if b.user_stack:
            f = b.user_stack[-1]
            where = f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.line.strip() if f.line else f.name})"
        reasons[(b.reason.splitlines()[0][:90], where)] += 1
    return ex.graph_count, ex.graph_break_count, reasons


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    x = torch.randn(2, 3, args.size, args.size)
    lines = [f"Model `{args.model}` at {args.size}x{args.size}, training mode, torch {torch.__version__}.", "",
             "| recipe | graphs | breaks | break reasons (count, where) |", "|---|---|---|---|"]
    recipes = ["(dense)"] + sorted(sparsify.builtin_recipes())
    for recipe in recipes:
        t = time.perf_counter()
        model = getattr(torchvision.models, args.model)()
        if recipe != "(dense)":
            model = sparsify.sparsify(model, recipe, total_steps=10, example_inputs=x[:1])
        try:
            graphs, breaks, reasons = explain(model, x)
            why = "<br>".join(f"{n}x {r} @ {w}" for (r, w), n in reasons.most_common()) or "-"
            lines.append(f"| {recipe} | {graphs} | {breaks} | {why} |")
        except Exception as exc:  # report, keep going
            lines.append(f"| {recipe} | - | - | explain failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |")
        print(f"{recipe}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
