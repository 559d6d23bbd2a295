"""Wall time of ``sparsify.sparsify()`` against two baselines measured in the same run:
``torch.fx.symbolic_trace`` of the same model and ``torch.ao.quantization.quantize_fx.prepare_qat_fx``
(the old fx module-swap design).

    python benchmarks/sparsify_time.py                       # resnet50 and vit_b_16, 5 repeats
    python benchmarks/sparsify_time.py --models resnet18 --repeats 3 --json out.json
    python benchmarks/sparsify_time.py --profile resnet50    # cProfile of one sparsify() call

Goals (issue 2): sparsify <= 3x the trace and <= 0.5x prepare_qat_fx. Each measurement is the
median (and the best) of ``--repeats`` runs, the three methods interleaved so that machine load hits them alike.
Baselines get a fresh deep copy outside the timer (prepare_qat_fx rewrites its input); sparsify is
timed as users call it (it copies the model itself), and also with ``inplace=True``.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import json
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsify  # noqa: E402


_CPU: dict[str, list[float]] = {}


def _timed(fn, key: str | None = None) -> float:
    """Wall seconds of ``fn()``; its process CPU seconds (all threads) go to ``_CPU[key]``."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    if key:
        _CPU.setdefault(key, []).append(cpu)
    return wall


def _prepare_qat(model, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))


def measure(name: str, repeats: int) -> dict:
    model = getattr(torchvision.models, name)().train()
    x = torch.randn(1, 3, 224, 224)
    times = {"symbolic_trace": [], "prepare_qat_fx": [], "sparsify": [], "sparsify_inplace": []}
    # one untimed round first: imports, allocator and caches warm
    torch.fx.symbolic_trace(copy.deepcopy(model))
    _prepare_qat(copy.deepcopy(model), x)
    sparsify.sparsify(model, "st3", total_steps=1000, example_inputs=x)
    _CPU.clear()
    for _ in range(repeats):
        m = copy.deepcopy(model)
        times["symbolic_trace"].append(_timed(lambda: torch.fx.symbolic_trace(m), "symbolic_trace"))
        m = copy.deepcopy(model)
        times["prepare_qat_fx"].append(_timed(lambda: _prepare_qat(m, x), "prepare_qat_fx"))
        times["sparsify"].append(_timed(lambda: sparsify.sparsify(model, "st3", total_steps=1000, example_inputs=x),
                                        "sparsify"))
        m = copy.deepcopy(model)
        times["sparsify_inplace"].append(_timed(
            lambda: sparsify.sparsify(m, "st3", total_steps=1000, example_inputs=x, inplace=True), "sparsify_inplace"))
        _timed(lambda: copy.deepcopy(model), "deepcopy")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    cpu = {k: min(v) for k, v in _CPU.items()}  # CPU time hardly depends on other processes' load
    return {
        "model": name, "repeats": repeats, "threads": torch.get_num_threads(),
        "median_s": med, "min_s": best, "min_cpu_s": cpu,
        "cpu_sparsify_vs_trace": cpu["sparsify"] / cpu["symbolic_trace"],
        "cpu_sparsify_vs_prepare_qat_fx": cpu["sparsify"] / cpu["prepare_qat_fx"],
        "cpu_inplace_vs_trace": cpu["sparsify_inplace"] / cpu["symbolic_trace"],
        "cpu_inplace_vs_prepare_qat_fx": cpu["sparsify_inplace"] / cpu["prepare_qat_fx"],
        "min_sparsify_vs_trace": best["sparsify"] / best["symbolic_trace"],
        "min_sparsify_vs_prepare_qat_fx": best["sparsify"] / best["prepare_qat_fx"],
        "min_inplace_vs_trace": best["sparsify_inplace"] / best["symbolic_trace"],
        "sparsify_vs_trace": med["sparsify"] / med["symbolic_trace"],
        "sparsify_vs_prepare_qat_fx": med["sparsify"] / med["prepare_qat_fx"],
        "inplace_vs_trace": med["sparsify_inplace"] / med["symbolic_trace"],
        "inplace_vs_prepare_qat_fx": med["sparsify_inplace"] / med["prepare_qat_fx"],
    }


def profile(name: str) -> None:
    model = getattr(torchvision.models, name)().train()
    x = torch.randn(1, 3, 224, 224)
    sparsify.sparsify(model, "st3", total_steps=1000, example_inputs=x)
    prof = cProfile.Profile()
    prof.enable()
    sparsify.sparsify(model, "st3", total_steps=1000, example_inputs=x)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vit_b_16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", metavar="MODEL", help="print a cProfile of one sparsify() call and exit")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args.profile)
        return
    results = []
    print(f"{'model':<10} {'trace s':>8} {'qat s':>8} {'sparsify s':>10} {'inplace s':>9} "
          f"{'/trace':>7} {'/qat':>6} {'inpl/trace':>10} {'inpl/qat':>8}")
    for name in args.models.split(","):
        r = measure(name, args.repeats)
        results.append(r)
        m = r["median_s"]
        print(f"{name:<10} {m['symbolic_trace']:8.3f} {m['prepare_qat_fx']:8.3f} {m['sparsify']:10.3f} "
              f"{m['sparsify_inplace']:9.3f} {r['sparsify_vs_trace']:7.2f} {r['sparsify_vs_prepare_qat_fx']:6.2f} "
              f"{r['inplace_vs_trace']:10.2f} {r['inplace_vs_prepare_qat_fx']:8.2f}  "
              f"(best of {r['repeats']}: /trace {r['min_sparsify_vs_trace']:.2f}, "
              f"/qat {r['min_sparsify_vs_prepare_qat_fx']:.2f}, inplace/trace {r['min_inplace_vs_trace']:.2f})",
              flush=True)
    print("process CPU seconds (best of repeats; all threads; insensitive to other processes' load):")
    for r in results:
        c = r["min_cpu_s"]
        print(f"{r['model']:<10} trace {c['symbolic_trace']:.3f}  prepare_qat_fx {c['prepare_qat_fx']:.3f}  "
              f"sparsify {c['sparsify']:.3f}  inplace {c['sparsify_inplace']:.3f}  deepcopy {c['deepcopy']:.3f}  "
              f"| sparsify/trace {r['cpu_sparsify_vs_trace']:.2f}  sparsify/qat {r['cpu_sparsify_vs_prepare_qat_fx']:.2f}"
              f"  inplace/trace {r['cpu_inplace_vs_trace']:.2f}  inplace/qat {r['cpu_inplace_vs_prepare_qat_fx']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
