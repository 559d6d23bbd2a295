"""What the build tells the user about how the model was captured (docs/capture.md): one warning line
for every submodule torch.fx could not trace and every warning held back while tracing, and a plan
note (and warning) per graph whose eval calls skip the nodes just inserted.

Apart from :mod:`sparsify.prepare.build`, which decides when each is said (not in a dry run).
"""
from __future__ import annotations

import warnings

from torch import nn

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
