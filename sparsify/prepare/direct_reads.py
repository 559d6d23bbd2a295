"""Conv/Linear layers whose weight the code around them reads directly.

A layer inside a forward torch.fx could not trace is rewritten module by module: its swap takes
effect where the code *calls* it. Code that instead hands its weight to an op itself (Mamba's
``self.dt_proj.weight @ x``, ``F.linear(h, self.proj.weight)``, ``conv1d.weight.squeeze(1)``)
reads the rewritten layer's dense parameter: the model would train dense there while finalize
stores the pruned weight, and the two disagree. Such layers are found in one watched eval forward
on the example inputs and left dense (in a traced graph such reads are rewired instead:
:mod:`sparsify.prepare.hidden`).
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify.core.eval_loop import run_eval

__all__ = ["direct_reads", "direct_warning", "DIRECT_READ", "READ_DIRECTLY"]

#: what the plan's reason for such a layer says (the plan's warnings leave it to :func:`direct_warning`)
READ_DIRECTLY = "read directly by the code around it"
#: the plan's reason for such a layer; ``{op}`` is the first op seen reading its weight
DIRECT_READ = (f"its weight is {READ_DIRECTLY} ({{op}}), not through a call of the layer: a sparse layer would "
               "compute with its dense weight there")


class _Reads(torch.overrides.TorchFunctionMode):
    """Notes the first op handed each watched weight (itself, or in a list or tuple argument)."""

    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights, self.seen = weights, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                name = self.weights.get(id(t)) if isinstance(t, torch.Tensor) else None
                if name is not None and name not in self.seen:
                    self.seen[name] = getattr(func, "__name__", None) or str(func)
        return func(*args, **kwargs)


def direct_reads(root: nn.Module, names: list[str], example_inputs) -> dict[str, str]:
    """``{layer: reason}`` for the layers ``names`` (never called as modules in the example forward)
    whose weight some op received in one eval forward of ``root`` on ``example_inputs``; ``{}``
    without example inputs, or when that forward fails (the caller's checks report it).

    >>> import torch.nn.functional as F
    >>> class Mixer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.proj = nn.Linear(4, 4); self.unused = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return F.linear(x, self.proj.weight)
    >>> direct_reads(Mixer(), ["proj", "unused"], (torch.zeros(1, 4),))
    {'proj': 'its weight is read directly by the code around it (linear), not through a call of the layer: a sparse layer would compute with its dense weight there'}
    """
    if not names or example_inputs is None:
        return {}
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    weights = {id(w): n for n in names if isinstance(w := getattr(root.get_submodule(n), "weight", None),
                                                        torch.Tensor)}
    mode = _Reads(weights)
    try:
        with torch.no_grad():
            run_eval(root, [inputs], tuple, None, [], context=lambda: mode)
    except Exception:
        return {}
    return {n: DIRECT_READ.format(op=op) for n, op in mode.seen.items()}


def direct_warning(found: dict[str, str]) -> str:
    """One line for every layer :func:`direct_reads` found.

    >>> direct_warning({"a.proj": DIRECT_READ.format(op="linear")})[:62]
    'sparsify: 1 layer stays dense: the code around it reads its we'
    """
    names = sorted(found)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    one = len(names) == 1
    return (f"sparsify: {len(names)} layer{'' if one else 's'} stay{'s' if one else ''} dense: the code around "
            f"{'it reads its weight' if one else 'them reads their weights'} directly, not through a call of the "
            f"layer ({shown}), so a sparse layer would compute with its dense weight there; see sparsify.plan")
