"""transformers families from tiny configs (no download) × the built-in recipes.

    .venv/bin/python benchmarks/transformers_coverage.py                  # coverage table, every recipe
    .venv/bin/python benchmarks/transformers_coverage.py --e2e --recipes st3 tl1 --families gpt2
    .venv/bin/python benchmarks/transformers_coverage.py --e2e --times --out docs/transformers.md

For each (family, recipe): ``sparsify.plan`` with example inputs, then the share of the Linear-like
weights (``nn.Linear``, transformers' ``Conv1D``, the patch / feature Conv layers) the recipe
rewrites, the activation nodes it rewrites (by kind), and the submodules that did not trace.
``--e2e`` also runs :func:`end_to_end`: sparsify, three optimizer steps on the model's own loss
(labels passed), report, finalize with its output check, then a save and reload of both the
sparsified and the finalized model with equal outputs. ``--times`` measures ``sparsify()`` (st3,
best of 3) against ``torch.fx.symbolic_trace`` and ``torch.export.export`` of the dense model.
"""
from __future__ import annotations

import argparse
import collections
import copy
import io
import math
import sys
import time
import warnings

import torch
from torch import nn

import sparsify
from sparsify.core.conv1d import linear_like
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.deploy import serialize
from sparsify.deploy.compare import flatten_tensors


def _ids(shape, high=100, low=0, seed=0):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg), (_ids((2, 8)),), {"labels": torch.tensor([0, 2])}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=False)  # untied: tests/test_tied_weights.py covers the tied GPT-2
    ids = _ids((2, 8))
    return GPT2LMHeadModel(cfg), (ids,), {"labels": ids}


def vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ViTForImageClassification(cfg), (x,), {"labels": torch.tensor([0, 2])}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    ids = _ids((2, 8))
    return LlamaForCausalLM(cfg), (ids,), {"labels": ids}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    labels = _ids((2, 6), low=1, seed=1)
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], 1)
    # positional: input_ids, attention_mask, decoder_input_ids (what the labels would shift to)
    return T5ForConditionalGeneration(cfg), (_ids((2, 8), low=1), None, dec), {"labels": labels}


def clip():
    from transformers import CLIPConfig, CLIPModel
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return CLIPModel(cfg), (_ids((2, 8), low=2), px), {"return_loss": True}


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    cfg = WhisperConfig(vocab_size=100, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1, tie_word_embeddings=False)
    feats = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    labels = _ids((2, 6), low=3, seed=1)
    dec = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1]], 1)
    # positional: input_features, attention_mask, decoder_input_ids
    return WhisperForConditionalGeneration(cfg), (feats, None, dec), {"labels": labels}


FAMILIES = {"bert": bert, "gpt2": gpt2, "vit": vit, "llama": llama, "t5": t5, "clip": clip, "whisper": whisper}
MODELS = {"BertForSequenceClassification": bert, "GPT2LMHeadModel": gpt2, "ViTForImageClassification": vit}


def _weight_layers(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if linear_like(m) or isinstance(m, WEIGHT_TYPES)}


def coverage(model: nn.Module, recipe: str, inputs) -> dict:
    """Linear-like layers, their parameters and activation nodes the recipe's plan rewrites."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, recipe, example_inputs=inputs)
    layers = _weight_layers(model)
    linear = {n: p for n, p in layers.items() if linear_like(_get(model, n))}
    done = {e.name for e in plan.rewritten}
    activations = collections.Counter(e.kind for e in plan.rewritten if e.name not in layers and not e.params)
    return {"linear": len(linear), "linear_rewritten": sum(1 for n in linear if n in done),
            "linear_param_share": sum(p for n, p in linear.items() if n in done) / max(1, sum(linear.values())),
            "weight_param_share": plan.shares()["param_share"],
            "activations": dict(activations), "fallbacks": [f["name"] or "<root>" for f in plan.fallbacks]}


def _get(model, name):
    return model.get_submodule(name)


def _loss(out) -> torch.Tensor:
    if getattr(out, "loss", None) is not None:
        return out.loss
    return sum(t.float().pow(2).mean() for t in flatten_tensors(out) if t.is_floating_point())


def _same(a, b, rtol=1e-4, atol=1e-5) -> None:
    for x, y in zip(flatten_tensors(a), flatten_tensors(b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def end_to_end(family: str, recipe: str, steps: int = 3) -> str:
    """sparsify, ``steps`` AdamW steps on the model's own loss, report, finalize (output check),
    save and reload (sparsified: state_dict into a fresh sparsify; finalized: ``torch.save`` of the
    finalized module and its compact weights file): "ok" or "<stage>: <error>"."""
    stage = "sparsify"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model, args, loss_kwargs = FAMILIES[family]()
            fresh = copy.deepcopy(model)  # the dense model, for a second sparsify to load into
            m = sparsify.sparsify(model, recipe, total_steps=steps, example_inputs=args)
            opt = torch.optim.AdamW(sparsify.param_groups(m, 1e-4), lr=1e-3)
            stage = "train"
            m.train()
            for _ in range(steps):
                loss = _loss(m(*args, **loss_kwargs)) + sparsify.penalty(m)
                if not math.isfinite(float(loss)):
                    raise FloatingPointError(f"loss is {float(loss)}")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sparsify.step(m)
            stage = "report"
            sparsify.report(m)
            stage = "save/reload sparse"
            m.eval()
            expected = m(*args)
            again = sparsify.sparsify(copy.deepcopy(fresh), recipe, total_steps=steps, example_inputs=args, copy=True)
            buf = io.BytesIO()
            torch.save(m.state_dict(), buf)
            buf.seek(0)
            again.load_state_dict(torch.load(buf, weights_only=True))
            _same(again.eval()(*args), expected)
            stage = "finalize"
            final = sparsify.finalize(m, args, rtol=1e-3, atol=1e-4)
            stage = "save/reload final"
            buf = io.BytesIO()
            torch.save(final, buf)  # the module itself: SAS finalizes to another architecture
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
            buf = io.BytesIO()
            serialize.save(final, buf)  # the compact weights file, into the reloaded module
            buf.seek(0)
            loaded.load_state_dict(serialize.load(buf))
            _same(loaded.eval()(*args), final(*args), rtol=1e-3, atol=1e-4)
        return "ok"
    except Exception as exc:
        return f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _best(fn, n=3) -> float:
    best = math.inf
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def times(family: str) -> dict:
    """``sparsify(st3)`` seconds (best of 3) and those of ``symbolic_trace`` / ``torch.export`` of the
    dense model (None when they fail, with the first line of the error)."""
    torch.manual_seed(0)
    model, args, _ = FAMILIES[family]()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["sparsify_s"] = _best(lambda: sparsify.sparsify(model, "st3", total_steps=10, example_inputs=args))
        for key, fn in (("symbolic_trace", lambda: torch.fx.symbolic_trace(model)),
                        ("export", lambda: torch.export.export(model, tuple(args)))):
            try:
                out[f"{key}_s"] = _best(fn, 1 if key == "export" else 3)
            except Exception as exc:
                out[f"{key}_s"] = None
                out[f"{key}_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:80]}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=sorted(sparsify.builtin_recipes()))
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--e2e", action="store_true", help="also train, report, finalize, save and reload")
    ap.add_argument("--times", action="store_true", help="sparsify() against symbolic_trace / torch.export")
    ap.add_argument("--out", help="also write the tables as the 'transformers' block of this page (docs/coverage.md)")
    args = ap.parse_args(argv)
    lines = []

    def emit(text: str = "") -> None:  # every table line also goes to --out
        lines.append(text)
        print(text, flush=True)

    emit("| family | recipe | Linear-like rewritten | their params | all weight params | activation nodes "
         "rewritten | untraceable (leaves)" + (" | end to end |" if args.e2e else " |"))
    emit("|---|---|---|---|---|---|---|" + ("---|" if args.e2e else ""))
    for family in args.families:
        for recipe in args.recipes:
            torch.manual_seed(0)
            model, inputs, _ = FAMILIES[family]()
            c = coverage(model, recipe, inputs)
            acts = ", ".join(f"{k} × {v}" for k, v in sorted(c["activations"].items())) or "-"
            fb = c["fallbacks"]
            row = (f"| {family} | {recipe} | {c['linear_rewritten']} of {c['linear']} | {c['linear_param_share']:.0%} | "
                   f"{c['weight_param_share']:.0%} | {acts} | {len(fb)} |")
            if args.e2e:
                row += f" {end_to_end(family, recipe)} |"
            emit(row)
    if args.times:
        emit("\n| family | sparsify(st3) (s) | symbolic_trace (s) | torch.export (s) |\n|---|---|---|---|")
        for family in args.families:
            t = times(family)
            cell = lambda k: f"{t[k + '_s']:.3f}" if t[k + "_s"] is not None else f"fails ({t[k + '_error']})"  # noqa: E731
            emit(f"| {family} | {t['sparsify_s']:.3f} | {cell('symbolic_trace')} | {cell('export')} |")
    if args.out:
        _write_block(args.out, lines, args)
    return 0


def _write_block(path: str, lines: list, args) -> None:
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location("_blocks", pathlib.Path(__file__).with_name("_blocks.py"))
    blocks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blocks)
    body = "\n".join([_INTRO.format(torch=torch.__version__, command=" ".join(sys.argv[1:]))] + lines)
    blocks.replace_block(pathlib.Path(path), "transformers", body)


_INTRO = """## transformers families (tiny configs) × built-in recipes

Produced by `.venv/bin/python benchmarks/transformers_coverage.py {command}` (torch {torch}, a
2-core AMD EPYC): for each family built from a tiny config (2 layers, width 32; no download) and each recipe, the
plan with example inputs. *Linear-like*: `nn.Linear` and transformers' `Conv1D`; *all weight
params*: every weight matrix the plan counts (the patch and feature convolutions, layers a method
refuses); *activation nodes*: the activation modules or calls the recipe rewrote, by kind;
*untraceable*: submodules kept as leaves (their children are rewritten one by one). SAS reaches only
layers fed by a relu (T5); semi-structured takes Conv2d layers only; T5 ties its LM head to the
embedding even with `tie_word_embeddings=False`: the weight recipes rewrite that head and the
embeddings read its effective weight (one mask, recipe option `tied`). Every cell also runs end to end
(sparsify, three AdamW steps on the model's own loss with labels, report, finalize with its output
check, save and reload) in `tests/test_transformers_families.py` (`--e2e` adds that column here).
The timing table compares `sparsify(model, "st3")` (best of 3) with `torch.fx.symbolic_trace` and
`torch.export.export` of the dense model on the same inputs.
"""


if __name__ == "__main__":
    sys.exit(main())
