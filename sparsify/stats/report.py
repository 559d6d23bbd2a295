"""``sparsify.report``: per-layer and global sparsity, parameters and MACs, target vs achieved."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import SparsifyState
from sparsify.stats.macs import layer_factors
from sparsify.prepare.hidden_positions import weight_numel
from sparsify.prepare.plan_entry import once
from sparsify.prepare.plan_wording import share_text
from sparsify.stats.method_params import left_out, method_parameters

__all__ = ["LayerRow", "Report", "build_report", "silenced_activations"]


@dataclass
class LayerRow:
    name: str
    method: str
    kind: str
    target: float | None  # scheduled target now
    final_target: float | None
    weight_sparsity: float | None  # achieved: fraction of zeros of the effective weight
    params: int
    nonzero_params: int
    macs: int | None  # dense MACs per sample
    nonzero_macs: int | None
    extra: dict = field(default_factory=dict)
    # what the method makes sparse ("weights", "input slots", "output positions", "activations")
    # and the fraction of it that is zero now (weights: weight_sparsity)
    sparsifies: str = "weights"
    achieved: float | None = None


@dataclass
class Report:
    """What :func:`sparsify.report` returns: print it, or ``to_dict()`` / ``to_json()``."""

    recipe: str
    step: int
    total_steps: int | None
    layers: list[LayerRow]
    groups: dict
    totals: dict

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "step": self.step, "total_steps": self.total_steps,
                "layers": [asdict(r) for r in self.layers], "groups": self.groups, "totals": self.totals}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _sparsified_line(self) -> str:
        """The zeros of the sparsified layers' weights, and the scheduled target beside the zeros of
        the same layers: where some layers have no weight target (SAS, semi-structured, STR) both
        are said, each naming its layers."""
        t = self.totals
        if t["weight_sparsity"] is None:
            return ""
        line = f"sparsified layers: {100 * t['weight_sparsity']:.1f}% of their weights are zero"
        if t["target"] is None:
            return line + "; "
        n = t["targeted_layers"]
        if n == sum(1 for r in self.layers if r.params):
            return line + f" (target now {100 * t['target']:.1f}%); "
        return (line + f"; the {n} layer{'s' * (n != 1)} with a weight target: "
                f"{100 * t['targeted_weight_sparsity']:.1f}% (target now {100 * t['target']:.1f}%); ")

    def __str__(self) -> str:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        def num(v):
            return "-" if v is None else f"{v:,}"
        # MAC names as defined in docs/macs.md
        rows = [("layer", "method", "sparsifies", "target", "achieved", "params", "non-zero", "dense MACs",
                 "non-zero-weight MACs")]
        executed = any("executed_macs" in r.extra for r in self.layers)  # methods that run more than they count (SAS)
        rows[0] += ("executed MACs",) if executed else ()
        for r in self.layers:
            rows.append((r.name, r.method, r.sparsifies, pct(r.target), pct(r.achieved), num(r.params or None),
                         num(r.nonzero_params if r.params else None), num(r.macs), num(r.nonzero_macs))
                        + ((num(r.extra.get("executed_macs", r.macs)),) if executed else ()))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"recipe {self.recipe!r}, step {self.step}" + (f" of {self.total_steps}" if self.total_steps else "")]
        for name, g in self.groups.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in g.items()))
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
        if not self.layers:  # said where the table would be, not left to an empty header
            lines.append("(no layer of this model is sparsified: the recipe matched none, or each stays dense for "
                         "the reason sparsify.plan(model, recipe) gives)")
        t = self.totals
        lines.append(
            self._sparsified_line()
            + f"whole model: {num(t['nonzero_params'])} of {num(t['params'])} parameters non-zero"
            + left_out(t.get("method_params"))
            + (f"; Conv/Linear non-zero-weight MACs {num(t['nonzero_macs'])} of {num(t['macs'])} dense "
               f"({pct(t['mac_reduction'])} fewer)" if t["macs"] else "")
            + (f"; executed MACs {num(t['executed_macs'])}" if t.get("executed_macs") not in (None, t["macs"]) else ""))
        if t["macs"] is None and any(r.params for r in self.layers):
            lines.append("MACs: '-': they are counted by one forward on example inputs, and none ran: "
                         + (t.get("macs_missing") or "no input ran") + "; pass example_inputs=... to sparsify")
        if (u := t.get("uncounted")) and t["macs"]:
            # worded and rounded as sparsify()'s warning says the same share
            lines.append(f"MACs: Conv/Linear layers only; {share_text(u['share'])} of the model's weight parameters "
                         f"(first: {u['first']}) are multiplied by kernels of their own (fused experts, recurrent "
                         "layers, other libraries' layers), stay dense, and are not in these counts")
        if t.get("achieved"):
            lines.append("achieved (what each method sparsifies): " + "; ".join(
                f"{kind} {pct(v)}" for kind, v in t["achieved"].items()))
        if any(r.extra.get("stale") for r in self.layers):  # the last evaluation's figure, not this step's
            lines.append("activations: counted by the last eval-mode forward, before the latest training "
                         "forwards: evaluate again for the current figure")
        if any(r.sparsifies == "activations" and r.achieved is None for r in self.layers):
            lines.append("activations: their zeros are counted by eval-mode forwards (model.eval(), then a "
                         "forward: your validation loop); '-' until one has run. A torch.compile'd "
                         "model's forwards are not counted: evaluate with the model sparsify returned")
        if t.get("empty_layers"):
            lines.append(f"warning: 100% sparse: {', '.join(t['empty_layers'])} (every weight pruned: "
                         "the output no longer depends on the input)")
        return "\n".join(lines)


def _outside_macs(plan) -> dict | None:
    """``{"share", "first"}`` of the weights the plan lists as multiplied outside Conv/Linear layers
    (fused experts, recurrent kernels, other libraries' layers) when they are 5% of the weight
    parameters the plan lists or more (the share sparsify()'s warning gives): the MAC counts leave
    them out (a Qwen-MoE's '90% fewer' was the attention's)."""
    if plan is None:
        return None
    total = sum(e.params for e in once(plan.entries))  # a layer called twice counts once
    if not total:
        return None
    outside = plan.kernel_weights()
    share = sum(e.params for e in outside) / total
    return {"share": share, "first": outside[0].name} if outside and share >= 0.05 else None


def _achieved_by_kind(rows: list[LayerRow]) -> dict:
    """Achieved sparsity per kind of thing sparsified, weighted by size: weights by parameters,
    the others by the ``elements`` their rows count (activation values seen, mask positions), a
    plain mean over layers where rows do not count them."""
    out = {}
    for kind in dict.fromkeys(r.sparsifies for r in rows):
        rs = [r for r in rows if r.sparsifies == kind and r.achieved is not None]
        if not rs:
            continue
        if kind == "weights":
            n = sum(r.params for r in rs)
            out[kind] = sum(r.achieved * r.params for r in rs) / n if n else None
        elif all(r.extra.get("elements") for r in rs):
            n = sum(r.extra["elements"] for r in rs)
            out[kind] = sum(r.achieved * r.extra["elements"] for r in rs) / n
        else:
            out[kind] = sum(r.achieved for r in rs) / len(rs)
    return out


def _plain(value):
    """``value`` with tensors as Python numbers (one element) or lists, in dicts and lists too:
    what a method's ``describe`` / ``layer_stats`` / ``target`` give goes into ``to_json``.

    >>> _plain({"tau": torch.tensor(0.5), "counts": [torch.tensor([1, 2])]})
    {'tau': 0.5, 'counts': [[1, 2]]}
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _weight(mod) -> torch.Tensor | None:
    """The weight a member ships: a sparse layer's deployed weight, a plain layer's own (a method
    that prunes plain layers in place, docs/writing-a-method.md); None for members without one."""
    if isinstance(mod, SparseWeightMixin):
        return mod.deployed_weight()
    w = getattr(mod, "weight", None)
    return w.detach() if isinstance(w, torch.Tensor) else None


@torch.no_grad()
def build_report(root, state: SparsifyState) -> Report:
    """The :class:`Report` of ``root`` (the unwrapped model) at ``state``'s current step, what
    :func:`sparsify.report` returns: one row per sparsified layer of each group (scheduled and final
    target, and, for weight-sparse layers, parameters, non-zeros of the deployed weight and MACs
    from :func:`~sparsify.stats.macs.layer_factors`; counts a method's ``layer_stats`` gives
    replace these), each group's description, and model-wide totals (parameters, with the
    sparsified layers' effective weights counted instead of their latent ones; dense and non-zero
    MACs of every Conv/Linear, ``None`` when no example input ran; achieved sparsity per kind;
    fully pruned layers). Runs without autograd; the first call may run one eval-mode forward to
    measure the MAC factors.
    """
    step = int(state.step)
    factors = layer_factors(state, root)
    layers, groups = [], {}
    # the members' own weights, which their deployed (or pruned) ones stand for in the totals
    sparse_weights: set[int] = set()
    for gname, group in state.groups.items():
        target = _plain(group.target(step))
        groups[gname] = _plain({"method": group.method_name, "target": target, **group.describe(step)})
        for name, mod in group.members.items():
            extra = _plain(dict(group.layer_stats(name, mod, factors.get(name))))
            row = LayerRow(name, group.method_name, type(mod).__name__, target, _plain(group.final_target()),
                           None, 0, 0, None, None, extra)
            w = _weight(mod)
            if w is not None:
                sparse_weights.add(id(mod.weight))
                nnz = int(torch.count_nonzero(w))
                row.params, row.nonzero_params = w.numel(), nnz
                row.weight_sparsity = 1.0 - nnz / w.numel()
                factor = factors.get(name)
                if factor is not None:
                    row.macs = int(round(factor * w.numel()))
                    row.nonzero_macs = int(round(factor * nnz))
            for key in ("params", "nonzero_params", "macs", "nonzero_macs", "weight_sparsity", "sparsifies",
                        "achieved"):
                if key in extra:  # a method with its own accounting (e.g. SAS) overrides
                    setattr(row, key, extra.pop(key))
            if row.sparsifies == "weights" and row.achieved is None:
                row.achieved = row.weight_sparsity
            layers.append(row)
    sparse_rows = [r for r in layers if r.params]
    sp = sum(r.params for r in sparse_rows)
    snz = sum(r.nonzero_params for r in sparse_rows)
    # the headline target and the zeros it is compared with count the same layers: those with a weight
    # target (SAS's widened weights and semi-structured's have targets of their own kinds: `achieved`)
    targeted = [r for r in sparse_rows if r.sparsifies == "weights" and r.target is not None]
    targets = [(r.target, r.params) for r in targeted]
    tp = sum(r.params for r in targeted)
    # the model's parameters as finalize ships them: not the methods' own (STR's thresholds), which
    # the totals count apart so that the report can say what its parameter count leaves out
    own = method_parameters(state)
    method_only = {i for ps in own.values() for i in ps}
    model_params = [(n, p) for n, p in root.named_parameters() if id(p) not in method_only]
    rewritten = {r.name for r in sparse_rows}
    param_total = sum(p.numel() for _, p in model_params)
    # model-wide non-zeros: the sparsified layers' effective weights replace their latent ones
    # (by identity too, sparse_weights: a tied weight is listed once, perhaps under its embedding's name)
    param_nnz = sum(int(torch.count_nonzero(p)) for n, p in model_params
                    if (n.rpartition(".")[0] not in rewritten or not n.endswith("weight")) and id(p) not in sparse_weights)
    param_nnz += snz
    dense_rest = dense_rest_nz = 0
    mods = dict(root.named_modules())
    for name, factor in factors.items():
        if name not in rewritten and (numel := weight_numel(mods, name)) is not None:
            dense_rest += int(round(factor * numel))
            dense_rest_nz += int(round(factor * _nonzero_weight(mods.get(name), numel)))
    macs = sum(r.macs or 0 for r in sparse_rows) + dense_rest if factors else None
    nz_macs = sum(r.nonzero_macs or 0 for r in sparse_rows) + dense_rest_nz if factors else None
    exec_macs = (sum(r.extra.get("executed_macs", r.macs or 0) for r in sparse_rows) + dense_rest
                 if factors else None)  # what dense hardware runs (SAS: M x the counted MACs)
    totals = {
        "weight_sparsity": 1.0 - snz / sp if sp else None,
        "target": sum(t * p for t, p in targets) / tp if tp else None,
        "targeted_weight_sparsity": 1.0 - sum(r.nonzero_params for r in targeted) / tp if tp else None,
        "targeted_layers": len(targeted),
        "params": param_total, "nonzero_params": param_nnz,
        "method_params": {name: sum(ps.values()) for name, ps in own.items() if ps},
        "macs": macs, "nonzero_macs": nz_macs, "executed_macs": exec_macs,
        "mac_reduction": 1.0 - nz_macs / macs if macs else None,
        "macs_missing": state.macs_missing if macs is None else None,  # why no MACs
        "achieved": _achieved_by_kind(layers),
        # layers with every weight pruned (a collapsed layer: see docs/methods/st3.md)
        "empty_layers": [r.name for r in sparse_rows if r.nonzero_params == 0],
        "uncounted": _outside_macs(getattr(state, "plan", None)),
    }
    # a recipe file without "name" is named after the file, as plan says (the name is not written
    # into the recipe's JSON, which checkpoints are compared with)
    name = state.recipe.get("name") or (state.plan.recipe if state.plan is not None else "")
    return Report(name, step, state.total_steps, layers, groups, totals)


def _nonzero_weight(mod, numel: int) -> int:
    """Non-zeros of a layer no method rewrote, as it computes (a layer under torch.nn.utils.prune
    multiplies by ``weight``, its mask applied); ``numel`` where that weight cannot be read."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() != numel or w.is_meta or type(w) not in (torch.Tensor, nn.Parameter):
        return numel
    return int(torch.count_nonzero(w))


def silenced_activations(rep: Report) -> str | None:
    """The warning when a regularized activation was zero everywhere in the last evaluation (a
    ``lam`` strong enough to silence a layer: what follows it gets no signal); None otherwise."""
    dead = [r.name for r in rep.layers if r.sparsifies == "activations" and r.achieved == 1.0]
    if not dead:
        return None
    return (f"sparsify.report: every value of {len(dead)} regularized activation(s) was zero in the last "
            f"evaluation ({', '.join(dead[:3])}{' ...' if len(dead) > 3 else ''}): the layers after them "
            "get no input, and the output no longer depends on it there; lower the rule's lam")
