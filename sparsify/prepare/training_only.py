"""Graphs that serve training only: a module whose forward branches on ``self.training`` is traced
on its training branch; an eval-mode call runs its own forward, without the nodes a method inserted
into its graph (docs/capture.md#training-and-eval-branches). ``sparsify`` says so once the nodes
are in (the plan's capture notes and a warning), ``finalize`` again (its output check cannot see
it: the sparse model and the deployed one skip them alike)."""
from __future__ import annotations

from torch import nn

__all__ = ["training_only_graphs", "skipping_line"]


def training_only_graphs(root: nn.Module) -> list[tuple[str, str, list[str]]]:
    """``(module name, class name, inserted nodes an eval call skips)`` for each graph of ``root``
    traced on a training branch that holds nodes added after the trace.

    >>> import torch, sparsify, warnings
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         x = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
    ...         return x * 2 if self.training else x
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     m = sparsify.sparsify(Net(), "semi-structured", total_steps=4, example_inputs=torch.randn(1, 3, 8, 8))
    >>> training_only_graphs(m)  # semi-structured's output mask, which applies in eval too
    [('', 'Net', ['conv_pmask'])]
    """
    out = []
    for name, m in root.named_modules():
        guard = m.__dict__.get("_call_guard")
        if guard is None or not any(flag == "training" and value for (_, flag), value in guard.modes.items()):
            continue
        if skipped := guard.added(m, training=False):
            out.append((name, type(m).__name__, skipped))
    return out


def skipping_line(name: str, cls: str, skipped: list[str], when: str = "in eval") -> str:
    """What one of :func:`training_only_graphs`' entries means, for the warnings that say it.

    >>> skipping_line("", "Net", ["conv_pmask"])
    'Net (<root>) branches on self.training and its graph holds the training branch, so in eval its own forward runs without conv_pmask'
    """
    return (f"{cls} ({name or '<root>'}) branches on self.training and its graph holds the training branch, so "
            f"{when} its own forward runs without {', '.join(skipped[:3])}{'...' if len(skipped) > 3 else ''}")
