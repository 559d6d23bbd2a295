"""One row of the plan (:class:`PlanEntry`), the reasons by whose opening words dense rows are told
apart, and :func:`once`, which counts a layer called several times once.

Apart from :mod:`sparsify.prepare.plan` because the modules that make rows (:mod:`~sparsify.prepare.dense`,
:mod:`~sparsify.prepare.unhandled`, the build) need the row and its reasons, not the Plan built from them.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PlanEntry", "STACKED", "FROZEN", "OWN_KERNEL", "FOREIGN_LAYER", "BARE", "bare_op", "once"]

#: how the plan's reason for a stacked weight tensor (fused MoE experts) begins
STACKED = "stacked weight matrices"
#: how the plan's reason for a layer left dense because it is frozen begins (prepare.unhandled)
FROZEN = "frozen (requires_grad=False)"
#: what the plan's reason for weights a fused kernel reads (LSTM, GRU, RNN, Bilinear)
#: says (prepare.unhandled)
OWN_KERNEL = "read by its own kernel"
#: what the plan's reason for another library's layer (a MoE router, PyG's Linear) says
FOREIGN_LAYER = "not a torch Conv/Linear layer"
#: how the plan's reason for a bare parameter a traced forward multiplies begins (prepare.unhandled),
#: followed by the op's name and " in graph "
BARE = "bare parameter multiplied by "


def bare_op(reason: str) -> str | None:
    """The op a :data:`BARE` reason names (``conv2d``, ``einsum``), else None.

    >>> bare_op(BARE + "conv2d in graph <root>: no layer to rewrite"), bare_op("frozen")
    ('conv2d', None)
    """
    if not reason.startswith(BARE):
        return None
    return reason[len(BARE):].split(" in graph ", 1)[0]


def once(entries) -> list:
    """``entries`` with each layer once (its first entry): a layer called several times has an
    entry per call, its weights one set, counted once in shares and totals.

    >>> [e.name for e in once([PlanEntry("fc", "Linear", None, 0), PlanEntry("fc", "Linear", None, 0)])]
    ['fc']
    """
    seen: set[str] = set()
    return [e for e in entries if not (e.name in seen or seen.add(e.name))]


@dataclass
class PlanEntry:
    """One matched site, one Conv/Linear left dense, or another weight matrix no method rewrites."""

    name: str
    kind: str  # module class name or op name
    method: str | None  # None: stays dense
    rule: int | None  # index of the winning rule, None when no rule matched
    reason: str = ""  # why it stays dense; on a rewritten site, a note (the modules sharing its weight) or ""
    params: int = 0  # weight parameters (Conv/Linear)
    macs: int | None = None  # dense MACs per sample at the example input size
