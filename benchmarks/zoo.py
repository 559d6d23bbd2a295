"""The torchvision zoo × every built-in recipe: sparsify, one training step, report, finalize.

    .venv/bin/python benchmarks/zoo.py --out docs/coverage.md            # everything (hours on 2 cores)
    .venv/bin/python benchmarks/zoo.py --models resnet18 swin_t --recipes st3 gmp
    nice -n 19 nohup .venv/bin/python benchmarks/zoo.py --out docs/coverage.md > zoo.log 2>&1 &

For each (model, recipe): ``sparsify`` (train-mode trace) on a small input, one SGD step with
``sparsify.penalty`` and ``sparsify.step``, ``sparsify.report``, ``sparsify.finalize`` with its
output check. Classification (80), segmentation and video models are traced whole; detection
models do not trace (loops over image lists), so the tracer falls back to their children and
their backbones are rewritten inside (status ``fallback``). Each result is appended to a JSON-lines
cache next to ``--out`` as soon as it is known, so an interrupted sweep resumes where it stopped
(``--fresh`` starts over). The markdown table is rewritten after every model.

Also recorded per model: ``torch.fx.symbolic_trace`` time of the dense model and the node count of
its graph, and ``sparsify()`` time per recipe, for the ratio reported in docs/coverage.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import sys
import time
import traceback
import warnings

import torch
import torch.fx as fx
import torchvision
from torchvision import models as tvm

import sparsify
from sparsify.deploy.compare import flatten_tensors
from sparsify.core.layers import WEIGHT_TYPES

FAMILIES = {
    "classification": tvm,
    "segmentation": tvm.segmentation,
    "video": tvm.video,
    "detection": tvm.detection,
}


HEAVY = ("vit_h", "vit_l", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "efficientnet_b7",
         "efficientnet_b6", "efficientnet_v2_l", "swin_v2_b", "swin_b", "swin3d_b", "mvit", "maxvit", "convnext_large")


def all_models() -> list[tuple[str, str]]:
    """``(family, name)`` of every torchvision model in the families above, the largest last."""
    out = []
    for family, module in FAMILIES.items():
        for name in tvm.list_models(module=module):
            out.append((family, name))
    return sorted(out, key=lambda fn: fn[1].startswith(HEAVY))


def build_model(family: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if family == "detection":
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # the default scipy truncated-normal init takes seconds
    if family == "segmentation":
        kwargs["weights_backbone"] = None
        kwargs["aux_loss"] = name.startswith(("fcn", "deeplab"))
    return tvm.get_model(name, **kwargs)


def _candidates(family: str, name: str) -> list[tuple]:
    if family == "video":
        return [(2, 3, 8, 64, 64), (2, 3, 16, 112, 112), (2, 3, 16, 224, 224)]
    if family == "detection":
        # (images, 3, h, w): two images where BatchNorm sees a 1×1 map in training (ssdlite)
        return [(1, 3, 96, 96), (2, 3, 96, 96)]
    return [(2, 3, 64, 64), (2, 3, 96, 96), (2, 3, 224, 224), (2, 3, 299, 299)]


def _forward_both_modes(family: str, name: str, model: torch.nn.Module, args) -> None:
    """Eval and train forward (no grad); BatchNorm statistics are restored afterwards."""
    state = model.state_dict()
    saved = type(state)((k, v.clone()) for k, v in state.items())
    saved._metadata = state._metadata  # MNASNet's loader reads its version from it
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*args)
            if family == "detection":
                model.train()(args[0], _targets(name, args[0]))
            else:
                model.train()(*args)  # inception_v3's aux head needs a larger input than its eval path
    finally:
        model.load_state_dict(saved)
        model.train(was_training)


def pick_input(family: str, name: str, model: torch.nn.Module):
    """The smallest input both the model's eval and train forwards accept (batch 2; detection:
    a list of images, one if that works)."""
    last = None
    for shape in _candidates(family, name):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        args = (list(x),) if family == "detection" else (x,)
        try:
            _forward_both_modes(family, name, model, args)
            return args
        except Exception as exc:  # too small for this model: try the next size
            last = exc
    raise RuntimeError(f"no input size worked: {type(last).__name__}: {str(last).splitlines()[0][:100]}")


def _targets(name: str, images: list[torch.Tensor]) -> list[dict]:
    """One box (and mask, keypoints) per image."""
    out = []
    for image in images:
        h, w = image.shape[-2:]
        t = {"boxes": torch.tensor([[4.0, 4.0, w / 2, h / 2]]), "labels": torch.tensor([1])}
        if "mask" in name:
            m = torch.zeros(1, h, w, dtype=torch.uint8)
            m[:, 4:h // 2, 4:w // 2] = 1
            t["masks"] = m
        if "keypoint" in name:
            t["keypoints"] = torch.tensor([[[8.0, 8.0, 1.0]] * 17])
        out.append(t)
    return out


def train_step(family: str, name: str, m: torch.nn.Module, inputs) -> float:
    opt = torch.optim.SGD(sparsify.param_groups(m, weight_decay=1e-4), lr=1e-3)
    m.train()
    if family == "detection":
        losses = m(inputs[0], _targets(name, inputs[0]))
        loss = sum(losses.values())
    else:
        loss = sum(t.float().pow(2).mean() for t in flatten_tensors(m(*inputs)) if t.is_floating_point())
    loss = loss + sparsify.penalty(m)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sparsify.step(m, loss)
    opt.zero_grad(set_to_none=True)  # report/finalize do not need them: a weight-sized copy less
    return float(loss.detach())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def trace_stats(model) -> dict:
    """Dense ``symbolic_trace`` time and node count (None when the root does not trace)."""
    model.train()
    t = time.perf_counter()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        return {"trace_s": None, "nodes": None, "trace_error": first_line(exc)}
    return {"trace_s": time.perf_counter() - t, "nodes": len(gm.graph.nodes)}


BIG = 100e6  # parameters above which each recipe gets a freshly built model instead of a copy


def run_one(family, name, recipe, model, inputs, copy: bool = True) -> dict:
    rec = {"model": name, "family": family, "recipe": recipe}
    stage = "sparsify"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = time.perf_counter()
            # every recipe must start from the same weights: the default mode shares the caller's
            # tensors, so one recipe's training step would carry into the next; hence a copy, or
            # (copy=False, models over BIG) a freshly built model per recipe
            m = sparsify.sparsify(model, recipe, total_steps=10, example_inputs=inputs, copy=copy)
            rec["sparsify_s"] = time.perf_counter() - t
        st = sparsify.core.state.find_state(m)
        plan = st.plan
        rec["fallbacks"] = [f["name"] or "<root>" for f in plan.fallbacks]
        rec["rewritten"] = len(plan.rewritten)
        rec["weight_layers"] = sum(1 for mod in model.modules() if isinstance(mod, WEIGHT_TYPES))
        rec["param_share"] = plan.shares()["param_share"]
        rec["warnings"] = sorted({str(w.message).splitlines()[0][:120] for w in caught
                                  if "could not be traced" not in str(w.message)})[:3]
        stage = "train step"
        rec["loss"] = train_step(family, name, m, inputs)
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']}")
        stage = "report"
        rep = sparsify.report(m)
        rec["report_layers"] = len(rep.layers)
        stage = "finalize"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", sparsify.FinalizeWarning)
            final = sparsify.finalize(m, inputs, rtol=1e-3, atol=1e-4)
        notes = [str(w.message) for w in caught if issubclass(w.category, sparsify.FinalizeWarning)]
        if notes:  # outputs differ only after code finalize did not change (detection NMS): say so
            rec["finalize_note"] = notes[0][:400]
        left = [type(x).__name__ for x in final.modules() if type(x).__module__.startswith("sparsify")]
        if left:
            raise RuntimeError(f"finalized model still holds sparsify modules: {sorted(set(left))[:3]}")
        rec["status"] = "fallback" if rec["fallbacks"] else "ok"
    except Exception as exc:
        rec["status"] = "failure"
        rec["stage"] = stage
        rec["reason"] = first_line(exc)
        rec["where"] = traceback.extract_tb(exc.__traceback__)[-1].filename.rsplit("/", 2)[-1] + ":" + \
            str(traceback.extract_tb(exc.__traceback__)[-1].lineno)
    return rec


def load_cache(path: str) -> dict:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[(r["model"], r["recipe"])] = r
    return done


def _sibling(name: str):
    """benchmarks/<name>.py, also when this file is loaded by path (tests/test_zoo_subset.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_markdown(out: str, results: dict, models: list[tuple[str, str]], recipes: list[str]) -> None:
    """docs/coverage.md from the sweep's results (benchmarks/_zoo_markdown.py)."""
    _sibling("_zoo_markdown").write_markdown(out, results, models, recipes, _sibling("_blocks"))


def _best(f, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def retime(models, recipes, results: dict, keep) -> None:
    """Re-measure ``trace_s`` and ``sparsify_s`` of the cached, successful runs (the default mode,
    which shares the model's tensors: what a user's call costs). The sweep's own timings come
    from whatever load the machine had while it ran."""
    for i, (family, name) in enumerate(models):
        todo = [rc for rc in recipes if results.get((name, rc), {}).get("status") in ("ok", "fallback")]
        if not todo:
            continue
        model = build_model(family, name)
        inputs = pick_input(family, name, model)
        model.train()
        trace = dict(results.get((name, "__trace__"), {"model": name, "family": family, "recipe": "__trace__",
                                                        "status": "trace"}))
        try:
            trace["trace_s"] = _best(lambda: fx.symbolic_trace(model), 3)
        except Exception:  # detection roots do not trace: keep the record as it is
            pass
        trace["timing"] = "retimed"
        keep(trace)
        for rc in todo:
            rec = dict(results[(name, rc)])
            with contextlib.redirect_stdout(io.StringIO()):
                rec["sparsify_s"] = _best(lambda: sparsify.sparsify(model, rc, total_steps=10,
                                                                    example_inputs=inputs), 2)
            rec["timing"] = "retimed"
            keep(rec)
        print(f"[{i + 1}/{len(models)}] {name}: retimed {len(todo)} recipes", flush=True)
        del model
        gc.collect()


def main(argv=None):
    ap = argparse.ArgumentParser(description="torchvision zoo × built-in recipes")
    ap.add_argument("--out", default="docs/coverage.md")
    ap.add_argument("--models", nargs="*", help="names (default: every model)")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--recipes", nargs="*", help="default: sparsify.builtin_recipes()")
    ap.add_argument("--cache", default=None, help="JSON-lines results (default: <out>.jsonl next to --out)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached results")
    ap.add_argument("--max-params", type=float, default=None, help="skip models with more parameters (millions)")
    ap.add_argument("--retime", action="store_true",
                    help="only re-measure sparsify() (default mode, best of 2) against symbolic_trace (best of "
                         "3) for the cached runs; updates the cache's timings")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.simplefilter("ignore")
    recipes = args.recipes or sorted(sparsify.builtin_recipes())
    models = [(f, n) for f, n in all_models() if f in args.families and (not args.models or n in args.models)]
    cache = args.cache or os.path.splitext(args.out)[0] + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    results = {} if args.fresh else load_cache(cache)
    if args.fresh and os.path.exists(cache):
        os.remove(cache)

    def keep(rec):
        results[(rec["model"], rec["recipe"])] = rec
        with open(cache, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if args.retime:
        retime(models, recipes, results, keep)
        write_markdown(args.out, results, models, recipes)
        return 0

    t_all = time.perf_counter()
    for i, (family, name) in enumerate(models):
        todo = [rc for rc in recipes if (name, rc) not in results]
        if not todo:
            continue
        model = build_model(family, name)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        if args.max_params and n_params > args.max_params:
            print(f"[{i + 1}/{len(models)}] {name}: {n_params:.0f}M parameters, skipped (--max-params)", flush=True)
            continue
        try:
            inputs = pick_input(family, name, model)
        except Exception as exc:
            for rc in todo:
                keep({"model": name, "family": family, "recipe": rc, "status": "failure", "stage": "input",
                      "reason": first_line(exc)})
            continue
        if (name, "__trace__") not in results:
            keep({"model": name, "family": family, "recipe": "__trace__", "status": "trace", **trace_stats(model)})
        big = n_params * 1e6 > BIG
        for j, rc in enumerate(todo):
            t = time.perf_counter()
            if big and j:  # a second copy of a 100M+ model would not fit beside the training state
                del model
                gc.collect()
                model = build_model(family, name)
            with contextlib.redirect_stdout(io.StringIO()):
                rec = run_one(family, name, rc, model, inputs, copy=not big)
            rec["seconds"] = time.perf_counter() - t
            keep(rec)
            print(f"[{i + 1}/{len(models)}] {name} × {rc}: {rec['status']}"
                  + (f" ({rec['stage']}: {rec['reason']})" if rec["status"] == "failure" else "")
                  + f" {rec['seconds']:.1f}s (total {time.perf_counter() - t_all:.0f}s)", flush=True)
            gc.collect()
        write_markdown(args.out, results, models, recipes)
    write_markdown(args.out, results, models, recipes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
