"""The GPU check (``make gpu-check``): correctness of every built-in recipe on CUDA and the GPU
benchmarks, in one command of a few minutes, writing ``gpu_check.json`` and ``gpu_check.md``
into ``--out``. docs/gpu.md says what it checks and with which tolerances.

    python3 benchmarks/gpu_check.py --out $OUT            # on a GPU machine (about 5 minutes)
    python3 benchmarks/gpu_check.py --out /tmp/x --dry-run # anywhere: tiny sizes, CPU, seconds

Correctness, for every built-in recipe on torchvision's resnet18 and vit_b_16 (weights=None):
the same initial model is sparsified on the CPU (float32) and on the GPU; the GPU copy trains a
few steps under bf16 autocast (task loss + ``sparsify.penalty``, SGD, ``sparsify.step``). Checked:
the first loss agrees with the CPU's within ``LOSS_RTOL`` (bf16 autocast rounds activations to 8
bits of mantissa), every loss is finite, for resnet18 the CPU trains the same steps and the loss
trajectories agree within ``TRAJ_RTOL`` (thresholds may select a few different weights after
bf16 gradients); a ``state_dict`` loaded into a freshly sparsified model gives identical outputs;
``sparsify.finalize`` passes its own check. Benchmarks: training-step time of every recipe vs dense
on ResNet-50 (batch 128, bf16 autocast, channels_last) and ViT-B/16 (batch 64, bf16 autocast),
``sparsify()`` time, and the 2:4 kernels of benchmarks/gpu_kernels.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparsify  # noqa: E402
from gpu_kernels import nm_vit_mlp, plain_linear_speed, sas_two_four, timed  # noqa: E402

LOSS_RTOL = 0.05
TRAJ_RTOL = 0.15


def _vit(tiny: bool, num_classes: int):
    if tiny:
        from torchvision.models.vision_transformer import VisionTransformer
        return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=num_classes)
    return torchvision.models.vit_b_16(num_classes=num_classes)


def model_specs(tiny: bool) -> dict:
    """name -> (constructor, batch, image size) for the correctness runs."""
    return {"resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 2 if tiny else 8, 32 if tiny else 112),
            "vit_b_16": (lambda: _vit(tiny, 10), 2 if tiny else 4, 32 if tiny else 224)}


def bench_specs(tiny: bool) -> dict:
    """name -> (constructor, batch, image size, channels_last) for the training-step benchmark
    (1000 classes; the dry run stands resnet18 in for resnet50)."""
    if tiny:
        return {"resnet50": (lambda: torchvision.models.resnet18(), 2, 32, True),
                "vit_b_16": (lambda: _vit(True, 1000), 2, 32, False)}
    return {"resnet50": (lambda: torchvision.models.resnet50(), 128, 224, True),
            "vit_b_16": (lambda: torchvision.models.vit_b_16(), 64, 224, False)}


def _data(batch, size, classes, device, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


def _train(model, batches, device, amp: bool) -> list[float]:
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=5e-4), lr=0.01, momentum=0.9)
    losses = []
    model.train()
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model, loss.detach())
        losses.append(float(loss.detach()))
    return losses


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-3)


def _equal(a, b) -> bool:
    """Exact equality of state: tensors, and the dicts / lists holding them (a method's extra
    state, e.g. semi-structured's frozen maps)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def check_recipe(name, make, batch, size, recipe, device, steps, cpu_train: bool) -> dict:
    """One (model, recipe) correctness check; see the module docstring."""
    row = {"model": name, "recipe": recipe}
    torch.manual_seed(0)
    init = make().state_dict()
    x0 = torch.zeros(1, 3, size, size)
    batches = _data(batch, size, 10, "cpu", steps)

    def build(dev):
        net = make()
        net.load_state_dict(init)
        return sparsify.sparsify(net.to(dev), recipe, total_steps=steps, example_inputs=x0.to(dev))

    ref = build("cpu")
    gpu = build(device)
    ref.train()
    # with autograd on: activation regularizers record their penalty only in a training forward
    # (sparsify.penalty then hands it over and clears it, so the CPU run below starts afresh)
    first_cpu = float((F.cross_entropy(ref(batches[0][0]), batches[0][1]) + sparsify.penalty(ref)).detach())
    # bf16 autocast on the GPU; the CPU dry run checks the script, in float32 (CPU bf16 is slow)
    losses = _train(gpu, [(x.to(device), y.to(device)) for x, y in batches], device, amp=device.type == "cuda")
    row["losses"] = losses
    row["first_loss_cpu"] = first_cpu
    problems = []
    if not all(l == l and abs(l) < 1e4 for l in losses):
        problems.append("non-finite loss")
    if not _close(losses[0], first_cpu, LOSS_RTOL):
        problems.append(f"first loss {losses[0]:.4f} vs CPU {first_cpu:.4f}")
    if cpu_train:
        cpu_losses = _train(ref, batches, torch.device("cpu"), amp=False)
        row["losses_cpu"] = cpu_losses
        bad = [i for i, (a, b) in enumerate(zip(losses, cpu_losses)) if not _close(a, b, TRAJ_RTOL)]
        if bad:
            problems.append(f"loss trajectory differs from CPU at steps {bad}")
    gpu.eval()
    x = batches[0][0][:2].to(device)
    with torch.no_grad():
        expected = gpu(x)
    fresh = build(device)
    fresh.load_state_dict(gpu.state_dict())
    fresh.eval()
    same = _equal(fresh.state_dict(), gpu.state_dict())
    with torch.no_grad():
        if not same or not torch.allclose(fresh(x), expected, rtol=1e-5, atol=1e-6):
            problems.append("state_dict round trip changed the state or the outputs")
    try:
        final = sparsify.finalize(gpu, x)
        with torch.no_grad():
            row["finalize_max_abs_diff"] = float((final(x) - expected).abs().max())
    except Exception as e:  # FinalizeError: the message names the layer
        problems.append(f"finalize: {str(e).splitlines()[0]}")
    row["ok"] = not problems
    row["problems"] = problems
    return row


def bench_model(name, make, batch, size, channels_last, recipes, device, steps) -> list[dict]:
    """Training-step time of dense and every recipe on one model (bf16 autocast), and sparsify() time."""
    x, y = _data(batch, size, 1000, device, 1)[0]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rows = []
    for recipe in ["dense"] + recipes:
        row = {"model": name, "recipe": recipe, "batch": batch}
        try:
            torch.manual_seed(0)
            net = make().to(device)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
            if recipe == "dense":
                model, opt = net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
            else:
                t = time.perf_counter()
                model = sparsify.sparsify(net, recipe, total_steps=10 ** 6, example_inputs=x[:1])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row["sparsify_s"] = time.perf_counter() - t
                opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=1e-3, momentum=0.9)
            model.train()

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = F.cross_entropy(model(x), y)
                    if recipe != "dense":
                        loss = loss + sparsify.penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if recipe != "dense":
                    sparsify.step(model, loss.detach())

            row["step_ms"] = timed(step, device, reps=steps, warmup=3 if device.type == "cuda" else 1) * 1e3
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
                torch.cuda.reset_peak_memory_stats()
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
        del row
    dense = next((r["step_ms"] for r in rows if r["recipe"] == "dense" and "step_ms" in r), None)
    for r in rows:
        if dense and "step_ms" in r:
            r["vs_dense"] = r["step_ms"] / dense
    return rows


def environment(device) -> dict:
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
           "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import jsonschema  # noqa: F401
        env["jsonschema"] = True
    except ImportError:
        env["jsonschema"] = False
    return env


def summary_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check ({'dry run, ' if result['dry_run'] else ''}{env.get('gpu', env['device'])})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, torchvision {env['torchvision']}, "
             f"{result['seconds']:.0f} s in all.", "", "## Correctness", "",
             "| model | recipe | ok | problems |", "|---|---|---|---|"]
    for r in result["correctness"]:
        lines.append(f"| {r['model']} | {r['recipe']} | {'yes' if r['ok'] else '**no**'} | "
                     f"{'; '.join(r['problems']) or ''} |")
    amp = "bf16 autocast" if env["device"].startswith("cuda") else "float32: dry run"
    lines += ["", f"## Training step vs dense ({amp})", "",
              "| model | recipe | step ms | vs dense | sparsify() s | note |", "|---|---|---|---|---|---|"]
    for r in result["bench"]:
        lines.append(f"| {r['model']} (batch {r['batch']}) | {r['recipe']} | {r.get('step_ms', float('nan')):.1f} | "
                     f"{r.get('vs_dense', float('nan')):.3f} | {r.get('sparsify_s', float('nan')):.2f} | "
                     f"{r.get('error', '')} |")
    nm = result.get("nm_2_4", {})
    lines += ["", "## N:M 2:4 inference (ViT-B/16 MLP blocks)", "", "```", json.dumps(nm, indent=1), "```"]
    sas = result.get("sas_2_4", {})
    lines += ["", "## SAS as 2:4", ""]
    if "cases" in sas:
        lines += ["| layer | GEMM | official ms | 2:4 ms (GEMM only) | 2:4 + compress ms | narrow dense ms | "
                  "vs official | rel. error |", "|---|---|---|---|---|---|---|---|"]
        for c in sas["cases"]:
            lines.append(f"| {c['layer']} | {c['gemm']} | {c['official_ms']:.3f} | {c['sparse_gemm_ms']:.3f} | "
                         f"{c['sparse_with_compress_ms']:.3f} | {c['narrow_dense_ms']:.3f} | "
                         f"{c['speedup_vs_official']:.2f} | {c['rel_error']:.1e} |")
    else:
        lines.append(f"skipped: {sas.get('skipped', 'not run')}")
    if result["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script itself")
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every built-in recipe")
    ap.add_argument("--models", nargs="*", default=None, help="default: resnet18 and vit_b_16 (correctness), "
                    "resnet50 and vit_b_16 (benchmarks)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; sections past it are skipped")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    tiny = args.dry_run
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if not tiny and device.type != "cuda":
        print("gpu_check: torch sees no CUDA device; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    recipes = args.recipes if args.recipes is not None else sorted(sparsify.builtin_recipes())
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    result = {"dry_run": tiny, "environment": environment(device), "loss_rtol": LOSS_RTOL, "traj_rtol": TRAJ_RTOL,
              "correctness": [], "bench": [], "skipped": []}

    def left() -> bool:
        return time.perf_counter() - start < args.budget

    steps = 2 if tiny else 3
    chosen = lambda name: args.models is None or name in args.models  # noqa: E731
    for name, (make, batch, size) in model_specs(tiny).items():
        if not chosen(name):
            continue
        for recipe in recipes:
            if not left():
                result["skipped"].append(f"correctness {name}/{recipe}: over the {args.budget:.0f} s budget")
                continue
            try:
                row = check_recipe(name, make, batch, size, recipe, device, steps, cpu_train=(name == "resnet18"))
            except Exception as e:
                row = {"model": name, "recipe": recipe, "ok": False,
                       "problems": [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"],
                       "traceback": traceback.format_exc(limit=4)}
            print(f"check {name} {recipe}: {'ok' if row['ok'] else row['problems']}", flush=True)
            result["correctness"].append(row)
    if device.type == "cuda":
        result["dense_tflops_bf16"] = plain_linear_speed(device, torch.bfloat16)
    for key, fn in (("nm_2_4", nm_vit_mlp), ("sas_2_4", sas_two_four)):
        try:
            result[key] = fn(device, torch.bfloat16, tiny) if left() else {"skipped": "over the budget"}
        except Exception as e:
            result[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{key}: {result[key]}", flush=True)
    if not args.skip_bench:
        for name, (make, batch, size, cl) in bench_specs(tiny).items():
            if not chosen(name):
                continue
            if not left():
                result["skipped"].append(f"training-step benchmark {name}: over the budget")
                continue
            rows = bench_model(name, make, batch, size, cl, recipes, device, steps=2 if tiny else 10)
            for r in rows:
                print(f"bench {r}", flush=True)
            result["bench"] += rows
    result["seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(summary_markdown(result))
    failed = [f"{r['model']}/{r['recipe']}" for r in result["correctness"] if not r["ok"]]
    print(f"gpu_check: {len(result['correctness']) - len(failed)} of {len(result['correctness'])} correctness checks "
          f"passed{'; failed: ' + ', '.join(failed) if failed else ''}; {result['seconds']:.0f} s; "
          f"wrote {args.out}/gpu_check.json and gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
