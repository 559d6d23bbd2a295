"""Extra memory of ``sparsify.sparsify()`` on resnet50 with ST-3, by summing tensor storages.

    python benchmarks/sparsify_memory.py                 # resnet50, st3
    python benchmarks/sparsify_memory.py --model vit_b_16 --recipe st3-sigma --json out.json

Goal (issue 2): no copy of the weights, nothing but the masks (1 byte per pruned weight) and
per-layer/per-channel scalars, in the default mode (new modules sharing the caller's tensors) and
with ``inplace=True``; ``copy=True`` is measured too (it copies the weights on purpose). Storages are told apart by their data pointer,
so a tensor shared with the caller's model is not counted twice; the peak resident set size of a
fresh process around the call (VmRSS / VmHWM) is printed as a cross-check that no transient copy
is made either (tracemalloc cannot see torch's allocator).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsify  # noqa: E402
from _report import write_json  # noqa: E402

MB = 2 ** 20
MODES = {"default": {}, "copy": {"copy": True}, "inplace": {"inplace": True}}


def storages(module: torch.nn.Module) -> dict[int, tuple[int, str]]:
    """data_ptr -> (bytes, kind) of every parameter and buffer storage reachable from ``module``."""
    out = {}
    for kind, tensors in (("parameter", module.named_parameters(remove_duplicate=False)),
                          ("buffer", module.named_buffers(remove_duplicate=False))):
        for name, t in tensors:
            s = t.untyped_storage()
            label = kind if kind == "parameter" else f"buffer:{name.rsplit('.', 1)[-1]}"
            out.setdefault(s.data_ptr(), (s.nbytes(), label))
    return out


def account(name: str, recipe: str) -> dict:
    model = getattr(torchvision.models, name)()
    x = torch.zeros(1, 3, 224, 224)
    before = storages(model)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    result = {"model": name, "recipe": recipe, "prunable_weights": weights,
              "caller_model_mb": sum(b for b, _ in before.values()) / MB}
    for mode, kw in MODES.items():
        m = sparsify.sparsify(model, recipe, total_steps=1000, example_inputs=x, **kw)
        after = storages(m)
        new = {p: v for p, v in after.items() if p not in before}
        by_kind: dict[str, float] = {}
        for nbytes, kind in new.values():
            by_kind[kind] = by_kind.get(kind, 0.0) + nbytes / MB
        shared_params = sum(1 for p, (_, k) in after.items() if k == "parameter" and p in before)
        result[mode] = {
            "new_mb": sum(by_kind.values()), "new_by_kind_mb": dict(sorted(by_kind.items())),
            "parameters_shared_with_caller": shared_params,
            "parameters_total": sum(1 for _, k in after.values() if k == "parameter"),
        }
        del m
    result["mask_mb_expected"] = weights / MB  # one bool per prunable weight
    return result


def _peak_child(name: str, recipe: str, mode: str) -> dict:
    """Resident memory of a fresh process before / after the call, and its peak during the call
    (VmHWM, reset through /proc/self/clear_refs right before it)."""
    code = (
        "import torch, torchvision, sparsify\n"
        "def mem():\n"
        "    d = dict(l.split(':') for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM')))\n"
        "    return {k: int(v.split()[0]) for k, v in d.items()}\n"
        f"m = torchvision.models.{name}(); x = torch.zeros(1, 3, 224, 224)\n"
        f"sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(2, 2)), {recipe!r}, total_steps=10)  # imports\n"
        "import ctypes, gc; gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)  # freed memory back to the OS\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "a = mem()\n"
        f"s = sparsify.sparsify(m, {recipe!r}, total_steps=1000, example_inputs=x, **{MODES[mode]!r})\n"
        "b = mem()\n"
        "print(a['VmRSS'], b['VmRSS'], b['VmHWM'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    before, after, peak = (int(v) / 1024 for v in out.stdout.split()[-3:])
    return {"rss_growth_mb": after - before, "peak_rss_growth_mb": peak - before}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--recipe", default="st3")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    args = ap.parse_args(argv)
    r = account(args.model, args.recipe)
    if not args.no_rss:
        for mode in MODES:
            r[mode].update(_peak_child(args.model, args.recipe, mode))
    print(f"{r['model']} ({r['prunable_weights']:,} prunable weights), recipe {r['recipe']}: "
          f"caller's model holds {r['caller_model_mb']:.1f} MB; masks expected {r['mask_mb_expected']:.1f} MB")
    for mode in MODES:
        d = r[mode]
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in d["new_by_kind_mb"].items())
        line = (f"  {mode:8s} new storage {d['new_mb']:.1f} MB ({kinds}); parameters shared with the caller: "
                f"{d['parameters_shared_with_caller']}/{d['parameters_total']}")
        if "rss_growth_mb" in d:
            line += f"; RSS growth {d['rss_growth_mb']:.1f} MB (peak {d['peak_rss_growth_mb']:.1f} MB)"
        print(line)
    write_json(args.json, r)


if __name__ == "__main__":
    main()
