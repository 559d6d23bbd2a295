"""Wall time of ``sparsify.sparsify()`` against two baselines measured in the same run:
``torch.fx.symbolic_trace`` of the same model and ``torch.ao.quantization.quantize_fx.prepare_qat_fx``
(the old fx module-swap design).

    python benchmarks/sparsify_time.py                       # resnet50 and vit_b_16, 5 repeats
    python benchmarks/sparsify_time.py --models resnet18 --repeats 3 --json out.json
    python benchmarks/sparsify_time.py --profile resnet50    # cProfile of one sparsify() call

Goals (issue 2): sparsify <= 3x the trace and <= 0.5x prepare_qat_fx. Each measurement is the
median (and the best) of ``--repeats`` runs, the three methods interleaved so that machine load hits them alike.
Baselines get a fresh deep copy outside the timer (prepare_qat_fx rewrites its input). sparsify is
timed in its three modes: the default (new modules sharing the caller's tensors), ``copy=True``
(an independent copy) and ``inplace=True`` (rewrites the caller's modules; fresh copy outside the timer).
"""
from __future__ import annotations

import argparse
import copy
import cProfile
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
from _report import write_json  # noqa: E402


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


MODES = {"sparsify": {}, "copy": {"copy": True}, "inplace": {"inplace": True}}


def measure(name: str, repeats: int) -> dict:
    model = getattr(torchvision.models, name)().train()
    x = torch.randn(1, 3, 224, 224)
    times = {k: [] for k in ("symbolic_trace", "prepare_qat_fx", *MODES)}
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
        for mode, kw in MODES.items():
            m = copy.deepcopy(model) if mode == "inplace" else model
            times[mode].append(_timed(
                lambda: sparsify.sparsify(m, "st3", total_steps=1000, example_inputs=x, **kw), mode))
        _timed(lambda: copy.deepcopy(model), "deepcopy")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    cpu = {k: min(v) for k, v in _CPU.items()}  # CPU time hardly depends on other processes' load
    ratios = {}
    for mode in MODES:
        for base, short in (("symbolic_trace", "trace"), ("prepare_qat_fx", "qat")):
            ratios[f"{mode}/{short}"] = {"median": med[mode] / med[base], "best": best[mode] / best[base],
                                         "cpu": cpu[mode] / cpu[base]}
    return {"model": name, "repeats": repeats, "threads": torch.get_num_threads(),
            "median_s": med, "min_s": best, "min_cpu_s": cpu, "ratios": ratios}


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
    for name in args.models.split(","):
        r = measure(name, args.repeats)
        results.append(r)
        print(f"{name}: median wall seconds " + ", ".join(f"{k} {v:.3f}" for k, v in r["median_s"].items()))
        print(f"{name}: best CPU seconds " + ", ".join(f"{k} {v:.3f}" for k, v in r["min_cpu_s"].items()))
        print(f"  {'ratio':<16} {'median':>7} {'best':>7} {'cpu':>7}")
        for k, v in r["ratios"].items():
            print(f"  {k:<16} {v['median']:7.2f} {v['best']:7.2f} {v['cpu']:7.2f}", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
