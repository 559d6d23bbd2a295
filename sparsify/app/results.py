"""The end of a ``sparsify train`` run: the final activation statistics and summary, the report
table, the finalized model (``final_state_dict.pt``), ``report.json``, ``history.json``,
``layers.png``, ``training.png`` and the closing line."""
from __future__ import annotations

from dataclasses import asdict

import torch

import sparsify as sp

from sparsify.app.checkpoint import save_atomic, write_json
from sparsify.app.summary import dead_inputs, dead_message, library_measurement, shown_kind, summarize
from sparsify.core.layers import WEIGHT_TYPES
from sparsify.stats.runstats import activation_stats


def thousands(v) -> str:
    """A count with thousands separators, ``-`` when there is none (the closing line, the demo's table).

    >>> thousands(1234567), thousands(None)
    ('1,234,567', '-')
    """
    return "-" if v is None else f"{v:,}"


def counted(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless ``n`` is 1 (what a user reads: "1 epoch", not "1 epochs").

    >>> counted(1, "epoch"), counted(8, "epoch"), counted(3, "batch")
    ('1 epoch', '8 epochs', '3 batches')
    """
    # "epoch" ends in a hard "ch": only the sibilant endings take "es"
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith(('tch', 'sh', 'ss', 'x')) else 's'}"


def _finish(model, cfg, data, out, history, opt_settings, total_steps, test_batches, example, seconds, say,
            ema=None, warned: list[str] | None = None) -> dict:
    from sparsify.app.plots import plot_history, plot_layers
    act = activation_stats(model, test_batches())
    if dead := dead_inputs(act):
        say(dead_message(dead, "at the end of training"))
    summary = summarize(model, cfg.dense, example, act)
    result = {"config": {**asdict(cfg), "resume": None}, "optimizer": opt_settings, "total_steps": total_steps,
              "data": {"name": data.name, "train": len(data.train), "test": len(data.test)},
              "accuracy": history[-1]["test_acc"] if history else None, **summary,
              "history": history, "activation": act, "measure": library_measurement(model, test_batches()),
              "seconds": seconds}
    weights = {}
    if not cfg.dense:
        rep = sp.report(model)
        result["report"] = rep.to_dict()
        # per layer: what its method sparsifies (weights, SAS slots, masked positions, ...)
        weights = {r.name: r.achieved for r in rep.layers if r.achieved is not None}
        targets = {r.name: r.target for r in rep.layers}
        kinds = sorted({"weight" if r.sparsifies == "weights" else shown_kind(r.sparsifies) for r in rep.layers})
        say(str(rep))
        result["finalize"] = _save_finalized(model, example, out / "final_state_dict.pt", say, "finalize")
    else:
        targets, kinds = {}, ["weight"]
        save_atomic(cpu_state(model), out / "final_state_dict.pt")  # nothing to finalize: the trained weights
        weights = {n: 1 - int(torch.count_nonzero(m.weight)) / m.weight.numel()
                   for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)}
    if ema is not None:
        result["ema"] = _finish_ema(ema, cfg, example, out, history, say)
    title = f"{cfg.model} / {cfg.recipe or 'dense'} / {data.name}"
    plot_layers(weights, {n: v["input_sparsity"] for n, v in act["layers"].items()}, out / "layers.png", title,
                targets=targets, label=" / ".join(kinds) + " sparsity")
    plot_history(history, out / "training.png", title)
    write_json(history, out / "history.json")
    result["warnings"] = list(warned or ())  # the run's, also those scrolled away or not shown (quiet)
    write_json(result, out / "report.json")
    say(f"test accuracy {result['accuracy']:.4f}; weight sparsity {summary['weight_sparsity'] or 0:.3f}; "
        f"layer-input sparsity {summary['activation_sparsity']:.3f}; MACs per sample (docs/macs.md): dense "
        f"{thousands(summary['dense_macs'])}, non-zero-weight {thousands(summary['nonzero_macs'])}, effective "
        f"{thousands(summary['effective_macs'])}, executed {thousands(summary['executed_macs'])}; results in {out}")
    return result


def cpu_state(model) -> dict:
    """``model``'s state dict with its tensors on the CPU: the saved files load on any machine."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def _save_finalized(model, example, path, say, what: str) -> str:
    """``finalize`` the model and save its ``state_dict`` to ``path``: "ok", or "failed: ..."
    (reported, not fatal: the trained checkpoint is still there)."""
    try:
        final = sp.finalize(model, example)
        save_atomic(cpu_state(final), path)
        return "ok"
    except Exception as e:
        say(f"warning: {what} failed: {e}")
        return f"failed: {type(e).__name__}: {e}"


def _finish_ema(ema, cfg, example, out, history, say) -> dict:
    """``--ema``: the average's last accuracy, sparsity and finalized weights (``ema_final_state_dict.pt``)."""
    found = {"decay": cfg.ema, "accuracy": history[-1].get("ema_test_acc") if history else None}
    if not cfg.dense:
        found["weight_sparsity"] = sp.report(ema).totals.get("weight_sparsity")
        found["finalize"] = _save_finalized(ema, example, out / "ema_final_state_dict.pt", say, "finalize of the EMA")
    else:
        save_atomic(cpu_state(ema.module), out / "ema_final_state_dict.pt")
    say(f"EMA (decay {cfg.ema}): test accuracy {found['accuracy']:.4f}"
        + (f", weight sparsity {found['weight_sparsity'] or 0:.3f}" if "weight_sparsity" in found else ""))
    return found
