"""A pass pipeline: each pass is ``GraphModule -> PassResult``.

After every pass that modified the graph the pipeline lints, recompiles and, when example
inputs are given, re-propagates shapes (``torch.fx.passes.shape_prop.ShapeProp``), so each pass
sees ``node.meta["tensor_meta"]`` of the graph as it is. Every change is kept in ``log``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .reproduce import kept_state
from .rewrite import Change

__all__ = ["PassResult", "Pipeline", "propagate_shapes"]


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) module, whether it changed, and the changes."""

    graph_module: fx.GraphModule
    modified: bool
    changes: list[Change] = field(default_factory=list)


Pass = Callable[[fx.GraphModule], PassResult]


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence) -> None:
    """Run ``ShapeProp`` on ``example_inputs`` without autograd and without changing the module's
    train/eval mode, so every node with a tensor output gets ``meta["tensor_meta"]`` (shape, dtype,
    ...). The forward is real, but what it changes is put back (:func:`~passes.reproduce.kept_state`:
    BatchNorm running statistics in train mode, the random state of dropout).

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> propagate_shapes(gm, [torch.zeros(3, 4)])
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"]
    [(3, 4), (3, 2)]
    """
    with torch.no_grad(), kept_state(gm):
        ShapeProp(gm).propagate(*example_inputs)


class Pipeline:
    """Run passes in order with lint + recompile (+ shape propagation) after each.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> noop = lambda gm: PassResult(gm, False)
    >>> Pipeline([noop]).run(gm).log
    []
    """

    def __init__(self, passes: Sequence[Pass], example_inputs: Sequence | None = None):
        self.passes = list(passes)
        self.example_inputs = example_inputs
        self.log: list[tuple[str, Change]] = []

    def run(self, gm: fx.GraphModule) -> "Pipeline":
        if self.example_inputs is not None:
            propagate_shapes(gm, self.example_inputs)
        for p in self.passes:
            result = p(gm)
            gm = result.graph_module
            name = getattr(p, "__name__", type(p).__name__)
            self.log.extend((name, c) for c in result.changes)
            if result.modified:
                gm.graph.lint()
                gm.recompile()
                if self.example_inputs is not None:
                    propagate_shapes(gm, self.example_inputs)
        self.graph_module = gm
        return self
