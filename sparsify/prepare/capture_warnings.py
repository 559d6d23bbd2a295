"""What the build tells the user about how the model was captured (docs/capture.md): one warning line
for every submodule torch.fx could not trace and every warning held back while tracing, a plan
note (and warning) per graph whose eval calls skip the nodes just inserted, and one for an exported
graph whose model is called with arguments the example did not pass (transformers' ``labels``).

Apart from :mod:`sparsify.prepare.build`, which decides when each is said (not in a dry run).
"""
from __future__ import annotations

import inspect
import warnings

from torch import nn

from passes.export_guard import ExportGuard

from sparsify.prepare.plan import Plan
from sparsify.prepare.training_only import skipping_line, training_only_graphs


def _note_training_only(root: nn.Module, plan: Plan) -> None:
    """Say, in the plan and once here, each graph whose eval calls skip the nodes just inserted
    (docs/capture.md#training-and-eval-branches): before, only the first eval call said it."""
    for name, cls, skipped in training_only_graphs(root):
        note = (skipping_line(name, cls, skipped) + ": evaluation and the finalized model do not apply them "
                "(docs/capture.md#training-and-eval-branches)")
        plan.capture_notes.append(note)
        warnings.warn(f"sparsify: {note}", stacklevel=4)


def tracing_summary(fallbacks, held: list[str]) -> str | None:
    """One line for everything tracing fell back on (the per-submodule reasons are in the plan).

    >>> from passes.tracing import Fallback
    >>> tracing_summary([Fallback("", "TypeError: x"), Fallback("h.0", "ValueError: y")], ["UserWarning: z"])[:60]
    'sparsify: torch.fx could not trace 2 submodules (the model r'
    """
    fallbacks = [f for f in fallbacks if not f.chosen]  # the plan gives the reason of a chosen one
    if not fallbacks and not held:
        return None
    names = [f.name or "the model root" for f in fallbacks]
    shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
    parts = []
    if fallbacks:
        parts.append(f"torch.fx could not trace {len(names)} submodule{'s' if len(names) != 1 else ''} ({shown}): "
                     "they run as they are and the layers inside them are rewritten module by module")
    if held:
        parts.append(f"{len(held)} warning{'s' if len(held) != 1 else ''} raised while tracing held back")
    return "sparsify: " + "; ".join(parts) + "; see sparsify.plan(model, recipe) for each reason"


def _note_export_calls(root: nn.Module, plan: Plan) -> None:
    """Say, in the plan and once here, which calls an exported root graph serves when its forward
    takes arguments the example left out that training or inference calls pass (transformers'
    ``labels``, keys of ``**kwargs``): those calls run the model's own forward, without the nodes
    just inserted, and this says so before the first of them (docs/capture.md#shapes-and-calls-the-graph-serves)."""
    guard = root.__dict__.get("_call_guard")
    if not isinstance(guard, ExportGuard) or not (added := guard.added(root, training=True)):
        return
    try:
        params = list(inspect.signature(guard.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return
    var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    var_pos = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    labels = [p.name for p in params if p.default is None and "label" in p.name]
    if var_kw is None and var_pos is None and not labels:
        return  # called as the example calls it, by position or keyword
    cls, skipped = type(root).__name__, ", ".join(added[:4]) + ("..." if len(added) > 4 else "")
    if guard.layout is None:  # *args: the graph takes the example's positional inputs only
        served, other = "calls with the example's positional inputs", "a call passing an input by keyword"
    else:
        given = [*guard.layout[0], *guard.layout[1]]
        named = " and ".join([", ".join(given[:-1])] * (len(given) > 1) + given[-1:])
        served = f"calls that pass {named} (by position or keyword)"
        also = [n for n in labels if n not in given]
        other = " or ".join(
            ([f"also passes {', '.join(also)}"] if also else []) +
            [f"leaves out {n}" for n in labels if n in given] +
            ([f"passes a key only **{var_kw} takes"] if var_kw else []))
        other = f"a call that {other}" + (" (model(**batch) with a batch that holds more)" if var_kw else "")
    note = (f'capture="export": the graph of {cls} serves {served}; {other} runs its own forward, without the nodes '
            f'sparsify inserted ({skipped}): give example_inputs what the calls that matter pass, or use capture="fx", whose '
            "graphs serve them all (docs/capture.md#shapes-and-calls-the-graph-serves)")
    plan.capture_notes.append(note)
    warnings.warn(f"sparsify: {note}", stacklevel=4)
