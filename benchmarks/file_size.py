"""File size of saved finalized models: ``torch.save(state_dict)`` (dense) against
``sparsify.deploy.serialize.save`` (bitmask + non-zero values), ResNet-18 and MobileNetV3-small.

Weight-sparsity recipes are set to reach their target at once (begin = end = 0) so the file holds
the recipe's final sparsity; recipes without weight sparsity show what the format costs them.

    .venv/bin/python benchmarks/file_size.py [--json out.json]
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torchvision

import sparsify
from sparsify.deploy.serialize import saved_size

from _report import write_json

CASES = [  # (label, recipe, overrides)
    ("dense (no recipe)", None, {}),
    ("st3 80%", "st3", {"sparsity": 0.8, "begin": 0, "end": 0, "fix": None}),
    ("st3 90%", "st3", {"sparsity": 0.9, "begin": 0, "end": 0, "fix": None}),
    ("st3 95%", "st3", {"sparsity": 0.95, "begin": 0, "end": 0, "fix": None}),
    ("gmp 90%", "gmp", {"begin": 0, "end": 0}),
    ("nm-2-4", "nm-2-4", {"begin": 0, "fix": None}),
    ("semi-structured 30%", "semi-structured", {"sparsity": 0.3, "begin": 0, "end": 0}),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = []
    for model_name in ("resnet18", "mobilenet_v3_small"):
        x = torch.randn(1, 3, 224, 224)
        for label, recipe, over in CASES:
            model = getattr(torchvision.models, model_name)()
            if recipe is None:
                final = model.eval()
            else:
                try:
                    final = sparsify.finalize(sparsify.sparsify(model, recipe, example_inputs=x, **over))
                except Exception as e:  # a recipe whose parameters differ: say so, keep going
                    print(f"{model_name} {label}: skipped ({type(e).__name__}: {e})")
                    continue
            sd = final.state_dict()
            weights = [v for k, v in sd.items() if v.is_floating_point() and v.dim() > 1]
            zeros = sum(int((v == 0).sum()) for v in weights) / max(1, sum(v.numel() for v in weights))
            dense_b, compact_b = saved_size(sd, compact=False), saved_size(sd, compact=True)
            row = {"model": model_name, "case": label, "weight_zeros": zeros, "dense_bytes": dense_b,
                   "compact_bytes": compact_b, "ratio": dense_b / compact_b}
            rows.append(row)
            print(f"{model_name:18s} {label:20s} zeros {100 * zeros:5.1f}%  dense {dense_b / 1e6:7.2f} MB  "
                  f"compact {compact_b / 1e6:7.2f} MB  ({row['ratio']:.2f}x smaller)", flush=True)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
