"""The dry run's result: what each rule matched, what stays dense and why, expected shares."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from sparsify.core.contract import HOOKED
from sparsify.core.subclasses import COMPUTED_WEIGHT, OWN_FORWARD
from sparsify.prepare.adapters import ADAPTER
from sparsify.prepare.direct_reads import READ_DIRECTLY
from sparsify.prepare.plan_entry import FOREIGN_LAYER, FROZEN, OWN_KERNEL, STACKED, PlanEntry, bare_op, once
from sparsify.prepare.plan_wording import misspelt_types, overruled_line, share_text
from sparsify.prepare.tied import TIED_DENSE

__all__ = ["PlanEntry", "Plan", "STACKED", "FROZEN", "OWN_KERNEL", "FOREIGN_LAYER", "once"]


@dataclass
class Plan:
    """``sparsify.plan(...)``'s result: print it, or use ``to_dict()`` / ``to_json()``."""

    recipe: str
    entries: list[PlanEntry] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)  # {"name", "reason", "chosen"}: submodules run as they are
    trace_warnings: list[str] = field(default_factory=list)  # warnings raised while tracing (held back)
    unmatched_rules: list[int] = field(default_factory=list)
    optional_rules: list[int] = field(default_factory=list)  # rules marked "optional": may match nothing
    # rule -> why it matched nothing: modules its method does not take (MatchTable.untaken), what its
    # name glob meant (block_hint)
    unmatched_hints: dict[int, str] = field(default_factory=dict)
    # {"rule", "later", "sites", "first", "broader"}: a rule that matched layers but decides none of
    # them, as the later rule "later" matches every one of them too (MatchTable.overruled)
    overruled_rules: list[dict] = field(default_factory=list)
    # {"name", "rule", "earlier", "reason"}: a site a rule's method declined that an earlier rule's
    # method would rewrite (later rules win: it stays dense)
    shadowed: list[dict] = field(default_factory=list)
    has_adapters: bool = False  # the model holds PEFT adapter layers (LoRA)
    input_shapes: list | None = None
    # {"name", "capture", "note"} per captured (sub)module: "torch.fx", "torch.export" or
    # "module by module" (untraceable: run as it is, its layers swapped); see docs/capture.md
    captures: list[dict] = field(default_factory=list)
    capture_notes: list[str] = field(default_factory=list)  # why auto chose as it did, eval caveats

    def frozen_matched(self, recipe) -> list[PlanEntry]:
        """The layers a rule with a method matched that stay dense because they are frozen."""
        return [e for e in once(self.dense) if e.reason.startswith(FROZEN) and e.rule is not None
                and recipe.rules[e.rule].method is not None]

    def kernel_weights(self) -> list[PlanEntry]:
        """Weights multiplied by kernels of their own, not by a Conv/Linear layer (fused experts,
        recurrent layers, other libraries' layer classes): dense, and outside the MAC counts."""
        return [e for e in once(self.dense) if e.params and (e.reason.startswith(STACKED) or OWN_KERNEL in e.reason
                                                             or FOREIGN_LAYER in e.reason)]

    def warnings(self, recipe) -> list[str]:
        """What ``sparsify`` warns about this plan of ``recipe`` (a loaded ``Recipe``): layers
        left dense because they compute with their own forward, rules that matched nothing
        (unless marked optional), a recipe whose methods declined every site they matched, and
        stacked weight tensors (fused MoE experts) that stay dense."""
        out = []
        total = sum(e.params for e in once(self.entries))  # a layer called twice: its weights count once
        dense = once(self.dense)
        own = [e for e in dense if OWN_FORWARD in e.reason]
        if own:  # a plain sparse layer would drop their forward (weight standardisation): said, not silent
            out.append(f"sparsify: {len(own)} layer(s) of class {', '.join(sorted({e.kind for e in own}))} left "
                       f"dense (first: {own[0].name}: {own[0].reason}); see sparsify.plan(model, recipe) and "
                       "docs/integrations.md#timm")
        computed = [e for e in dense if COMPUTED_WEIGHT in e.reason]
        if computed:  # weight_norm & co.: the user can remove the parametrization first
            share = sum(e.params for e in computed) / max(1, total)
            out.append(f"sparsify: {len(computed)} layer(s) left dense, {share_text(share)} of the model's weight "
                       f"parameters: their weight is computed, not a parameter (first: {computed[0].name}: "
                       f"{computed[0].reason})")
        hooked = [e for e in dense if HOOKED in e.reason]
        if hooked:  # the rewrite would bypass or change what the caller's hooks do: said, not silent
            out.append(f"sparsify: {len(hooked)} layer(s) left dense for the hooks registered on them or on the "
                       f"relu feeding them (first: {hooked[0].name}: {hooked[0].reason}); see "
                       "sparsify.plan(model, recipe) and docs/hooks.md")
        adapters = [e for e in dense if e.reason.startswith(ADAPTER)]
        if adapters:  # sparse LoRA factors would make nothing sparse: said, with the ways in
            out.append(f"sparsify: {len(adapters)} layer(s) of PEFT adapters left dense ({adapters[0].reason}); see "
                       "docs/integrations.md#peft-lora")
        for i in self.unmatched_rules:
            if not recipe.data["rules"][i].get("optional"):  # optional: may match nothing (no downsample layers)
                out.append(f"sparsify: rule {i} of recipe {recipe.name!r} matched nothing "
                           f"({recipe.rules[i].match}){misspelt_types(recipe.rules[i].match)}"
                           f"{self.unmatched_hints.get(i, '')}; see "
                           "sparsify.plan(model, recipe)")
        for o in self.overruled_rules:
            if not recipe.data["rules"][o["rule"]].get("optional"):  # as for a rule that matches nothing
                both = recipe.rules[o["rule"]].method and recipe.rules[o["later"]].method
                # the reorder advice only where the later rule is the broad one: an exception that
                # matches exactly the earlier rule's layers (the only Linear is the last) is already after
                fix = ("a layer takes one method, so two methods on the same layers do not combine: give each "
                       "rule its own layers; " if both else
                       "put an exception after the broad rule it narrows; " if o.get("broader", True) else "")
                out.append(f"sparsify: recipe {recipe.name!r}: {overruled_line(o, recipe.rules)}; {fix}see "
                           "sparsify.plan(model, recipe)")
        # sites a rule with a method matched and its method left dense (not: no rule, an exclusion)
        # (computed weights are named above; a PEFT model's frozen base layers are what adapters mean)
        declined = [e for e in dense if e.rule is not None and recipe.rules[e.rule].method is not None
                    and COMPUTED_WEIGHT not in e.reason]
        said = (OWN_FORWARD, FROZEN, READ_DIRECTLY, TIED_DENSE, HOOKED)  # each has a line of its own
        if not self.rewritten and declined and not adapters:  # rules matched, every method left its sites alone
            pool = [e for e in declined if not any(s in e.reason for s in said)] or declined
            reasons = Counter(e.reason for e in pool)
            first = max(pool, key=lambda e: reasons[e.reason])  # the first of the most common reason
            shown = (f"first: {first.name}" if reasons[first.reason] == 1 else
                     f"{reasons[first.reason]} of them for this reason, first: {first.name}")
            out.append(f"sparsify: recipe {recipe.name!r} rewrote nothing in this model: {len(declined)} matched "
                       f"site(s) stay dense ({shown}: {first.reason}); see sparsify.plan(model, recipe)")
        shadowed = {s["name"] for s in self.shadowed}
        quiet = [e for e in declined if not any(s in e.reason for s in said) and e.name not in shadowed
                 and not e.reason.startswith(ADAPTER)]
        if self.rewritten and quiet and sum(e.params for e in quiet) >= 0.1 * total:  # N:M on Linear(30, ...)
            out.append(f"sparsify: {len(quiet)} layer(s) the recipe matched stay dense, declined by their method, "
                       f"{share_text(sum(e.params for e in quiet) / total)} of the model's weight parameters (first: "
                       f"{quiet[0].name}: {quiet[0].reason}); see sparsify.plan(model, recipe)")
        by_rule: dict[tuple[int, int], list[dict]] = {}
        for s in self.shadowed:
            by_rule.setdefault((s["rule"], s["earlier"]), []).append(s)
        for (rule, earlier), sites in by_rule.items():
            out.append(f"sparsify: rule {rule} ({recipe.rules[rule].method}) of recipe {recipe.name!r} declines "
                       f"{len(sites)} layer(s) that rule {earlier} ({recipe.rules[earlier].method}) would rewrite "
                       f"(first: {sites[0]['name']}: {sites[0]['reason']}); later rules win, so they stay dense: "
                       f"narrow rule {rule}'s match to the layers its method takes")
        frozen = self.frozen_matched(recipe)
        if frozen and not self.has_adapters:  # the headline sparsity counts the rewritten layers only
            # (a PEFT model's base layers are frozen by design: what its adapters mean)
            share = sum(e.params for e in frozen) / max(1, total)
            out.append(f"sparsify: {len(frozen)} frozen layer(s) (requires_grad=False) that the recipe matched "
                       f"stay dense, {share_text(share)} of the model's weight "
                       f"parameters (first: {frozen[0].name}); "
                       '"options": {"frozen": "include"} in the recipe sparsifies them too (see sparsify.plan)')
        fused = [e for e in dense if OWN_KERNEL in e.reason]
        if fused and sum(e.params for e in fused) >= 0.05 * total:  # an LSTM is 41% of timm's sequencer2d
            out.append(f"sparsify: {len(fused)} module(s) whose weights a fused kernel reads stay dense, "
                       f"{share_text(sum(e.params for e in fused) / total)} of the model's weight parameters (first: "
                       f"{fused[0].name}, {fused[0].kind}): no method rewrites them (see sparsify.plan)")
        stacked = [e for e in dense if e.reason.startswith(STACKED)]
        if stacked:  # the report's "sparsified layers" figure would read as the model's
            out.append(f"sparsify: {len(stacked)} stacked weight tensor(s) stay dense, "
                       f"{share_text(sum(e.params for e in stacked) / total)} of the model's weight parameters "
                       f"(first: {stacked[0].name}, read by the forward of {stacked[0].kind.split('.')[0]}: fused "
                       "experts, which no method rewrites); see docs/transformers.md#mixture-of-experts")
        return out

    @property
    def rewritten(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.method is not None]

    @property
    def dense(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.method is None]

    def shares(self) -> dict:
        """Fractions of the weight parameters (Conv/Linear and the other weight matrices listed) and
        of their MACs that the rewritten layers hold."""
        weighted = [e for e in once(self.entries) if e.params]  # each layer once, however often called
        total_p = sum(e.params for e in weighted)
        hit_p = sum(e.params for e in weighted if e.method is not None)
        out = {"param_share": hit_p / total_p if total_p else 0.0, "mac_share": None}
        if weighted and all(e.macs is not None for e in weighted):
            total_m = sum(e.macs for e in weighted)
            hit_m = sum(e.macs for e in weighted if e.method is not None)
            out["mac_share"] = hit_m / total_m if total_m else 0.0
        return out

    def _macs_unknown(self) -> str:
        """Why the plan gives no MAC share: which weights have no MAC count, and what would count them."""
        if self.input_shapes is None:
            return "MACs unknown for some layers: pass example_inputs that run them"
        unknown = [e for e in once(self.entries) if e.params and e.macs is None]
        names = ", ".join(e.name for e in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        ops = list(dict.fromkeys(bare_op(e.reason) for e in unknown))
        if unknown and None not in ops:
            return (f"MACs unknown for {names}: bare parameters multiplied by {' / '.join(ops)} in the forward are "
                    "not counted")
        return f"MACs unknown for {names}: the example forward did not run them as layers"

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "entries": [asdict(e) for e in self.entries],
                "fallbacks": self.fallbacks, "trace_warnings": self.trace_warnings, "unmatched_rules": self.unmatched_rules,
                "overruled_rules": self.overruled_rules,
                "input_shapes": self.input_shapes, "captures": self.captures,
                "capture_notes": self.capture_notes, **self.shares()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = [("layer / node", "kind", "rule", "method", "params", "MACs", "note")]
        calls: dict[str, int] = {}
        for e in self.entries:
            # a layer called several times has a row per call: its weights and MACs in the first
            k = calls[e.name] = calls.get(e.name, 0) + 1
            again = f"call {k} of this layer (its weights and MACs are in its first row)" if k > 1 else ""
            rows.append((e.name, e.kind, "-" if e.rule is None else str(e.rule), e.method or "dense",
                         f"{e.params:,}" if e.params and not again else "",
                         f"{e.macs:,}" if e.macs and not again else "", "; ".join(filter(None, (again, e.reason)))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [f"plan for recipe {self.recipe!r}"]
        for r in rows:
            lines.append(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip())
        s = self.shares()
        if not any(e.params for e in self.entries):
            lines.append(f"{len(once(self.rewritten))} sites rewritten; no weight matrices found")
        else:
            lines.append(f"{len(once(self.rewritten))} sites rewritten, {len(once(self.dense))} weight layers left "
                         f"dense; rewritten layers hold {s['param_share']:.1%} of the weight parameters listed"
                         + (f" and {s['mac_share']:.1%} of their MACs" if s["mac_share"] is not None else
                            f" ({self._macs_unknown()})"))
        how = {}
        for c in self.captures:
            how.setdefault(c["capture"], []).append(c["name"] or "<root>")
        if how:
            lines.append("captured by " + "; ".join(
                f"{k}: {', '.join(v[:4])}{f', ... ({len(v) - 4} more)' if len(v) > 4 else ''}" for k, v in how.items()))
        for note in self.capture_notes:
            lines.append(f"capture: {note}")
        for fb in self.fallbacks:
            kind = "runs its own forward, children traced" if fb.get("chosen") else "untraceable, kept as a leaf"
            lines.append(f"{kind}: {fb['name'] or '<root>'}: {fb['reason']}")
        for w in self.trace_warnings:
            lines.append(f"warning while tracing: {w}")
        for i in self.unmatched_rules:
            if i in self.optional_rules:  # as sparsify() does not warn about it
                lines.append(f"note: rule {i} (optional) matched nothing{self.unmatched_hints.get(i, '')}")
            else:
                lines.append(f"warning: rule {i} matched nothing{self.unmatched_hints.get(i, '')}")
        for o in self.overruled_rules:
            lines.append(f"warning: {overruled_line(o)}")
        return "\n".join(lines)
