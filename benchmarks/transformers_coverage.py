"""What each recipe reaches in transformers models built from tiny configs (no download).

    .venv/bin/python benchmarks/transformers_coverage.py                 # st3 and tl1, markdown table
    .venv/bin/python benchmarks/transformers_coverage.py --recipes st3 sas-m4 --e2e

For each (model, recipe): ``sparsify.plan`` with example inputs, then the share of Linear layers
(``nn.Linear`` and transformers' ``Conv1D``, GPT-2's transposed Linear) and of their parameters the
recipe rewrote, the activation nodes it rewrote (by kind), and
the untraceable submodules kept as leaves. ``--e2e`` also runs sparsify, two training steps,
report and finalize with its output check (benchmarks/zoo.py's pipeline) and prints the status.
The table goes into docs/integrations.md.
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
import warnings

import torch
from torch import nn

import sparsify
from sparsify.deploy.compare import flatten_tensors
from sparsify.core.conv1d import linear_like


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg), (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)


def vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


MODELS = {"BertForSequenceClassification": bert, "GPT2LMHeadModel": gpt2, "ViTForImageClassification": vit}


def coverage(model: nn.Module, recipe: str, inputs) -> dict:
    """Linear / Conv1D layers, their parameters and activation nodes the recipe's plan rewrites."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, recipe, example_inputs=inputs)
    linear = {n: m.weight.numel() for n, m in model.named_modules() if linear_like(m)}
    done = {e.name for e in plan.rewritten}
    activations = collections.Counter(e.kind for e in plan.rewritten if e.name not in linear and not e.params)
    return {"linear": len(linear), "linear_rewritten": sum(1 for n in linear if n in done),
            "linear_param_share": sum(p for n, p in linear.items() if n in done) / max(1, sum(linear.values())),
            "activations": dict(activations), "fallbacks": [f["name"] or "<root>" for f in plan.fallbacks]}


def end_to_end(model: nn.Module, recipe: str, inputs, steps: int = 2) -> str:
    """sparsify, ``steps`` SGD steps, report, finalize with its output check: "ok" or the error."""
    stage = "sparsify"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = sparsify.sparsify(model, recipe, total_steps=steps, example_inputs=inputs)
            opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
            stage = "train"
            m.train()
            for _ in range(steps):
                out = m(*inputs)
                loss = sum(t.float().pow(2).mean() for t in flatten_tensors(out) if t.is_floating_point())
                loss = loss + sparsify.penalty(m)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sparsify.step(m)
                if not math.isfinite(float(loss)):
                    raise FloatingPointError(f"loss is {float(loss)}")
            stage = "report"
            sparsify.report(m)
            stage = "finalize"
            sparsify.finalize(m, inputs, rtol=1e-3, atol=1e-4)
        return "ok"
    except Exception as exc:
        return f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=["st3", "tl1"])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--e2e", action="store_true", help="also train two steps, report and finalize")
    args = ap.parse_args(argv)
    print("| model | recipe | Linear/Conv1D rewritten | their params | activation nodes rewritten | untraceable (leaves)"
          + (" | end to end |" if args.e2e else " |"))
    print("|---|---|---|---|---|---|" + ("---|" if args.e2e else ""))
    for name in args.models:
        for recipe in args.recipes:
            torch.manual_seed(0)
            model, inputs = MODELS[name]()
            c = coverage(model, recipe, inputs)
            acts = ", ".join(f"{k} × {v}" for k, v in sorted(c["activations"].items())) or "-"
            row = (f"| {name} | {recipe} | {c['linear_rewritten']} of {c['linear']} | {c['linear_param_share']:.0%} | "
                   f"{acts} | {', '.join(c['fallbacks']) or '-'} |")
            if args.e2e:
                torch.manual_seed(0)
                model, inputs = MODELS[name]()
                row += f" {end_to_end(model, recipe, inputs)} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
