"""What a ``sparsify train`` run reports about its model: test accuracy, weight sparsity, MACs,
measured activation sparsity."""
from __future__ import annotations

import torch
from torch import nn

import sparsify as sp
from sparsify.app.outputs import logits_of
from sparsify.core.layers import WEIGHT_TYPES, SparseWeightMixin
from sparsify.core.modes import kept_modes
from sparsify.prepare.inputs import positions_per_sample

__all__ = ["evaluate", "weight_sparsity", "summarize", "library_measurement", "dead_inputs", "dead_message",
           "shown_kind"]


def shown_kind(kind: str, adjective: bool = True) -> str:
    """How the epoch line (``adjective``: "... sparsity") and ``training.png`` name what a method
    sparsifies (a ``sparsify.report`` kind): the regularizers' "activations" read as the same figure as
    the layer-input sparsity beside it, which counts zeros elsewhere (the inputs of Conv/Linear layers).

    >>> shown_kind("activations"), shown_kind("activations", adjective=False), shown_kind("input slots")
    ('regularized-activation', 'regularized activations', 'input slots')
    """
    if kind == "activations":
        return "regularized-activation" if adjective else "regularized activations"
    return kind


def evaluate(model: nn.Module, batches) -> float:
    """Top-1 accuracy over ``batches`` in eval mode."""
    correct = total = 0
    with kept_modes(model, training=False):
        for x, y in batches:
            correct += int((logits_of(model(x)).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def weight_sparsity(model: nn.Module, dense: bool) -> float | None:
    """Fraction of zeros of the weights the recipe sparsified (dense runs: of all Conv/Linear)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, SparseWeightMixin) or (dense and isinstance(m, WEIGHT_TYPES)):
            w = m.deployed_weight() if isinstance(m, SparseWeightMixin) else m.weight
            zeros += w.numel() - int(torch.count_nonzero(w))
            total += w.numel()
    return zeros / total if total else None


def summarize(model: nn.Module, dense: bool, example, act: dict) -> dict:
    """The comparison numbers of a trained model: weight sparsity, parameters (total / non-zero),
    MACs per sample (dense / non-zero-weight / effective weight x activation / executed: docs/macs.md)."""
    if not dense:
        t = sp.report(model).totals
        out = {"weight_sparsity": t["weight_sparsity"], "params": t["params"], "nonzero_params": t["nonzero_params"],
               "dense_macs": t["macs"], "nonzero_macs": t["nonzero_macs"], "executed_macs": t.get("executed_macs"),
               "achieved": t.get("achieved") or {}}
    else:
        params = sum(p.numel() for p in model.parameters())
        nnz = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        factors = positions_per_sample(model, example)
        mods = dict(model.named_modules())
        macs = int(round(sum(f * mods[n].weight.numel() for n, f in factors.items())))
        nz = int(round(sum(f * int(torch.count_nonzero(mods[n].weight)) for n, f in factors.items())))
        out = {"weight_sparsity": weight_sparsity(model, True), "params": params, "nonzero_params": nnz,
               "dense_macs": macs, "nonzero_macs": nz, "executed_macs": macs, "achieved": {}}
    out["activation_sparsity"] = act["activation_sparsity"]
    out["effective_macs"] = int(round(act["effective_macs"]))
    return out


def library_measurement(model: nn.Module, batches) -> dict | None:
    """``sparsify.measure`` on the test batches (its multiplicative MACs also skip the output
    positions of semi-structured masks; padding counts as zero input there), or None."""
    fn = getattr(sp, "measure", None)
    if fn is None:
        return None
    try:
        m = fn(model, batches)
        return {"mult_macs": m.mult_macs, "dense_macs": m.dense_macs, "node_zero_fraction": m.zero_fraction}
    except Exception as e:  # a measurement problem must not lose a finished run
        return {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def dead_inputs(act: dict) -> list[str]:
    """Layers whose every input value was zero on the batches :func:`activation_stats` ran: what
    they compute no longer depends on the data (an activation penalty too strong, a dead ReLU
    layer).

    >>> dead_inputs({"layers": {"conv": {"input_sparsity": 0.4}, "fc": {"input_sparsity": 1.0}}})
    ['fc']
    """
    return [name for name, v in act["layers"].items() if v.get("input_sparsity") == 1.0]


def dead_message(dead: list[str], when: str) -> str:
    """The warning line for :func:`dead_inputs`' layers."""
    return (f"warning: every input of {', '.join(dead)} is zero on the test data {when}: the output no longer "
            f"depends on the input (an activation penalty too strong? lower lam)")
