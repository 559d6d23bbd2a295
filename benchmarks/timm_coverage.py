"""timm architectures × every built-in recipe, called the way timm users call them.

    .venv/bin/python benchmarks/timm_coverage.py --out docs/coverage-timm.md      # everything (~30 min, 2 cores)
    .venv/bin/python benchmarks/timm_coverage.py --models resnet18 tf_efficientnet_b0 --recipes st3 sas

For each (model, recipe): ``timm.create_model(name, pretrained=False, num_classes=10, **small)``,
``sparsify`` (train mode, ``total_steps=10``, example inputs), one SGD step on
``cross_entropy + sparsify.penalty(m)`` (the penalty recipes: a term > 0, i.e. the inserted nodes ran) (gradient norm clipped to 1) with ``sparsify.step(m)``, ``sparsify.report``, ``sparsify.finalize``
with its output check, and, when the finalized model has the architecture timm builds (every
recipe but SAS, which finalizes to another module tree), its ``state_dict`` loaded into a fresh
``timm.create_model`` of the same name, with outputs equal to the finalized model's. ``ok``: all of
it, the whole model traced; ``fallback``: it worked with some submodule rewritten module by module
(untraceable leaf); ``failure``: the stage and the first line of the error.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

import sparsify
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.state import find_state

# name: (create_model keyword arguments that keep it small, input side). Chosen to cover the
# distinct graph kinds timm has; each comment says what it adds.
MODELS = {
    "resnet18": ({}, 32),                                     # basic blocks, torchvision-like
    "resnet10t": ({}, 32),                                    # deep tiered stem, avg-pool downsample
    "resnest14d": ({}, 32),                                   # split attention (radix softmax)
    "res2net50_14w_8s": ({}, 32),                             # hierarchical split/cat blocks
    "resnetv2_50x1_bit": ({}, 32),                            # StdConv2d (weight standardisation), pre-act
    "nf_resnet26": ({}, 32),                                  # ScaledStdConv2d, no BatchNorm
    "efficientnet_b0": ({}, 32),                              # BatchNormAct2d (SiLU inside BN), SE
    "tf_efficientnet_b0": ({}, 32),                           # Conv2dSame (TF 'same' padding)
    "mobilenetv3_small_100": ({}, 32),                        # hard-swish, hard-sigmoid SE
    "mobilenetv4_conv_small": ({}, 32),                       # universal inverted bottleneck
    "mixnet_s": ({}, 32),                                     # create_conv2d MixedConv2d (kernel-size groups)
    "ghostnet_100": ({}, 32),                                 # ghost modules (cheap ops, slicing)
    "lcnet_050": ({}, 32),                                    # depthwise-separable, hard-swish
    "regnetx_002": ({}, 32),                                  # grouped convs
    "repvgg_a0": ({}, 32),                                    # ByobNet re-parameterisable blocks
    "mobileone_s0": ({}, 32),                                 # over-parameterised branches
    "dla34": ({}, 32),                                        # deep layer aggregation trees
    "cspresnet50": ({}, 32),                                  # cross-stage partial splits
    "densenet121": ({}, 32),                                  # BatchNormAct2d, dense concatenation
    "hrnet_w18_small": ({}, 32),                              # multi-resolution branches, upsampling
    "convnext_atto": ({}, 32),                                # LayerNorm2d, channels-last MLP
    "edgenext_xx_small": ({}, 32),                            # conv + transposed attention
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),           # ViT: fused qkv Linear, class token
    "deit_tiny_distilled_patch16_224": ({"img_size": 32}, 32),  # two heads (head, head_dist)
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 2}, 64),  # window attention
    "mixer_s16_224": ({"img_size": 32}, 32),                  # token-mixing MLP
    "levit_128s": ({"img_size": 64}, 64),                     # attention biases, Linear+BN
    "maxvit_nano_rw_256": ({"img_size": 64}, 64),             # MBConv + block/grid attention
    "coatnet_nano_rw_224": ({"img_size": 64}, 64),            # conv stages then relative attention
    "efficientformerv2_s0": ({"img_size": 64}, 64),           # 4-D attention with convs
    "fastvit_t8": ({}, 32),                                   # RepMixer, large-kernel depthwise
    "mobilevit_xxs": ({}, 32),                                # unfold/fold transformer in a CNN
    "efficientvit_b0": ({}, 32),                              # ReLU linear attention
    "rexnet_100": ({}, 32),                                   # BatchNormAct2d everywhere, SE with ReLU6
    "resmlp_12_224": ({"img_size": 32}, 32),                  # Affine norms, token-mixing Linear
    "cait_xxs24_224": ({"img_size": 32}, 32),                 # class attention, LayerScale
    "poolformerv2_s12": ({}, 32),                             # pooling token mixer, StarReLU
    "davit_tiny": ({}, 32),                                   # channel attention, Downsample reading kernel_size
    "efficientvit_m0": ({"img_size": 64}, 64),                # cascaded group attention (mode-dependent biases)
    "mobilevitv2_050": ({}, 64),                              # separable linear attention
    "repvit_m1": ({}, 32),                                    # re-parameterisable depthwise blocks
    "hgnetv2_b0": ({}, 32),                                   # learnable affine blocks, light convs
    "tiny_vit_5m_224": ({}, 64),                              # MBConv stem, window attention
}
# Left out, being slow to build or to run on 2 CPU cores at any input size they accept:
# beit/eva (relative position tables, 86M), vgg (129M), nest (224² input only).


PENALTY_RECIPES = ("tl1", "activation-l1", "activation-hoyer")  # a training forward records a term > 0


def build(name: str) -> tuple[torch.nn.Module, tuple]:
    import timm
    kwargs, side = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    return model, (x,)


def weight_share(model: torch.nn.Module, plan) -> float:
    """The share of Conv/Linear weight parameters in layers the plan rewrote."""
    return plan.shares()["param_share"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def run_one(name: str, recipe: str) -> dict:
    import timm
    rec = {"model": name, "recipe": recipe}
    stage = "build"
    t0 = time.perf_counter()
    try:
        model, inputs = build(name)
        stage = "sparsify"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = sparsify.sparsify(model, recipe, total_steps=10, example_inputs=inputs)
        plan = find_state(m).plan
        # chosen: traceable, run as they are on purpose (a mode-branching BatchNormAct2d, a root taking labels)
        rec["fallbacks"] = [f["name"] or "<root>" for f in plan.fallbacks if not f["chosen"]]
        rec["rewritten"] = len(plan.rewritten)
        rec["weight_layers"] = sum(1 for mod in model.modules() if isinstance(mod, WEIGHT_TYPES))
        rec["param_share"] = weight_share(model, plan)
        rec["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught})[:4]
        stage = "train step"
        opt = torch.optim.SGD(sparsify.param_groups(m, weight_decay=1e-4), lr=1e-3)
        m.train()
        labels = torch.arange(inputs[0].shape[0]) % 10
        logits = m(*inputs)
        penalty = sparsify.penalty(m)
        if find_state(m).groups and recipe in PENALTY_RECIPES and not float(penalty) > 0:
            # the nodes inserted into the graph did not run (the graph not taken, or bypassed)
            raise RuntimeError(f"the {recipe} penalty of a training forward is {float(penalty)}")
        loss = F.cross_entropy(logits, labels) + penalty
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"loss is {float(loss)}")
        opt.zero_grad()
        loss.backward()
        # BatchNorm over batch 2 at a 1x1 map gives gradients of 1e5 at random init: clipped as a
        # user would, or the eval-mode outputs overflow after the step (dense models too)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sparsify.step(m)
        stage = "report"
        if recipe in PENALTY_RECIPES and find_state(m).groups:
            m.eval()
            with torch.no_grad():
                m(*inputs)  # an evaluation: the activation figures come from its inserted nodes
            if any(r.achieved is None for r in sparsify.report(m).layers if r.sparsifies == "activations"):
                raise RuntimeError("an eval forward ran none of the inserted nodes: report has no activation figure")
        sparsify.report(m)
        stage = "finalize"
        final = sparsify.finalize(m, inputs, rtol=1e-3, atol=1e-4)
        left = sorted({type(x).__name__ for x in final.modules() if type(x).__module__.startswith("sparsify")})
        if left:
            raise RuntimeError(f"finalized model still holds sparsify modules: {left[:3]}")
        stage = "reload"
        torch.manual_seed(1)
        fresh = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name][0])
        if same_architecture(final, fresh):
            buf = io.BytesIO()
            torch.save(final.state_dict(), buf)
            buf.seek(0)
            fresh.load_state_dict(torch.load(buf, weights_only=True))
            with torch.no_grad():
                torch.testing.assert_close(fresh.eval()(*inputs), final.eval()(*inputs), rtol=1e-4, atol=1e-5)
            rec["reload"] = True
        elif recipe.startswith("sas"):
            rec["reload"] = False  # SAS finalizes to a wider module tree: no timm model to load into
        else:
            raise RuntimeError("the finalized model's state_dict does not fit timm.create_model's")
        rec["status"] = "fallback" if rec["fallbacks"] else "ok"
    except Exception as exc:
        rec["status"] = "failure"
        rec["stage"] = stage
        rec["reason"] = first_line(exc)
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        rec["where"] = f"{tb.filename.rsplit('/', 2)[-1]}:{tb.lineno}"
    rec["seconds"] = time.perf_counter() - t0
    return rec


def cell(r: dict) -> str:
    if r["status"] == "failure":
        return f"**fail** ({r['stage']})"
    reach = (f"{r['rewritten']} nodes" if not r["param_share"] and r.get("rewritten") else f"{r['param_share']:.0%}")
    return f"{r['status']} {reach}"


def markdown(results: list[dict], models: list[str], recipes: list[str], command: str) -> str:
    import timm
    by = {(r["model"], r["recipe"]): r for r in results}
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("ok", "fallback", "failure")}
    L = ["# Coverage: timm models × built-in recipes", "",
         f"Generated by `.venv/bin/python benchmarks/timm_coverage.py {command}` on a 2-core AMD EPYC CPU",
         f"(torch {torch.__version__}, timm {timm.__version__}). Each model is built as a timm user builds it,",
         "`timm.create_model(name, pretrained=False, num_classes=10, ...)` with a small `img_size` where the",
         "architecture takes one, batch 2. For each recipe: `sparsify` (train mode, `total_steps=10`, example",
         "inputs), one SGD step on `cross_entropy + sparsify.penalty(m)` (gradient norm clipped to 1) with",
         "`sparsify.step(m)` (the penalty recipes must record a term > 0 there: their inserted nodes ran),",
         "an eval forward whose inserted nodes must give `sparsify.report` an activation figure (penalty recipes), "
         "`sparsify.report`,",
         "`sparsify.finalize` with its output check (rtol 1e-3), then the finalized `state_dict` loaded into a",
         "fresh `timm.create_model` of the same name with equal outputs (every recipe but SAS, whose",
         "finalized model is another module tree; semi-structured loads only where its maps round to no masked",
         "position at these small inputs, since a mask that masks stays a `<conv>_pmask` module). `ok`: all of",
         "it, the whole model traced (modules run as they are on purpose, a mode-branching `BatchNormAct2d`",
         "under the recipes that insert nodes, count as traced); `fallback`: some",
         "submodule was kept as an untraceable leaf and rewritten module by module inside; `failure`: the",
         "stage and the first line of the error. The percentage is the share of Conv/Linear weight",
         "parameters in the layers the recipe rewrote (semi-structured: the convs whose outputs it masks);",
         "a recipe that only inserts nodes (tl1) shows how many (an activation module that an untraceable",
         "forward calls twice, EfficientViT's LiteMLA kernel, is one node: its one-call graph runs for",
         "both calls). BiT (`resnetv2_50x1_bit`) and NFNets",
         "(`nf_resnet26`) are built of `StdConv2d` / `ScaledStdConv2d`, which standardise their weight in",
         "their forward: the weight methods leave them dense and rewrite only the head",
         "([integrations.md](integrations.md#timm)); semi-structured masks their outputs. Left out: BEiT/EVA,",
         "VGG and NesT (slow to build or to run at any input they accept on 2 cores), EfficientFormer v1",
         "(its attention biases fit 224² inputs only). `seconds`: the 13 runs of the row.", "",
         f"Result: {len(models)} models, {len(results)} runs: {counts['ok']} ok, {counts['fallback']} fallback, "
         f"{counts['failure']} failure.", "",
         "| model | " + " | ".join(recipes) + " | seconds |", "|---|" + "---|" * (len(recipes) + 1)]
    for name in models:
        rows = [by.get((name, rc)) for rc in recipes]
        secs = sum(r["seconds"] for r in rows if r)
        L.append(f"| {name} | " + " | ".join(cell(r) if r else "" for r in rows) + f" | {secs:.0f} |")
    failures = [r for r in results if r["status"] == "failure"]
    if failures:
        L += ["", "## Failures", "", "| model | recipe | stage | reason | where |", "|---|---|---|---|---|"]
        L += [f"| {r['model']} | {r['recipe']} | {r['stage']} | {r['reason'].replace('|', '/')} | {r['where']} |"
              for r in failures]
    fb = sorted({(r["model"], ", ".join(r["fallbacks"][:3])) for r in results if r.get("fallbacks")})
    if fb:
        L += ["", "## Fallbacks (untraceable submodules kept as leaves)", ""]
        L += [f"- {m}: {f}" for m, f in fb]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--recipes", nargs="*", default=sorted(sparsify.builtin_recipes()))
    ap.add_argument("--out", help="write the markdown page here (docs/coverage-timm.md)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    results = []
    for name in args.models:
        for rc in args.recipes:
            rec = run_one(name, rc)
            results.append(rec)
            print(f"{name} × {rc}: {rec['status']} {rec['seconds']:.1f}s"
                  + (f" ({rec['stage']}: {rec['reason']} @ {rec['where']})" if rec["status"] == "failure" else "")
                  + (f" fallbacks={rec['fallbacks'][:3]}" if rec.get("fallbacks") else ""), flush=True)
    if args.out:
        command = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        with open(args.out, "w") as f:
            f.write(markdown(results, args.models, args.recipes, command))
    return 0 if all(r["status"] != "failure" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
