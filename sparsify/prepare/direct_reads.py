"""Conv/Linear layers whose weight the code around them reads directly.

A layer inside a forward torch.fx could not trace is rewritten module by module: its swap takes
effect where the code *calls* it. Code that instead hands its weight to an op itself (Mamba's
``self.dt_proj.weight @ x``, ``F.linear(h, self.proj.weight)``, ``conv1d.weight.squeeze(1)``)
reads the rewritten layer's dense parameter, whether or not it also calls the layer: the model
would train dense there while finalize stores the pruned weight, and the two disagree. Such
layers are found in one eval forward on the example inputs, watched by
:class:`sparsify.core.param_reads.ParamReads`, and left dense (in a traced graph such reads are
rewired instead: :mod:`sparsify.prepare.hidden`).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from sparsify.core.eval_loop import run_eval
from sparsify.core.param_reads import ParamReads

__all__ = ["direct_reads", "direct_warning", "DIRECT_READ", "READ_DIRECTLY"]

#: what the plan's reason for such a layer says (the plan's warnings leave it to :func:`direct_warning`)
READ_DIRECTLY = "read directly by the code around it"
#: the plan's reason for such a layer; ``{op}`` is the first op seen reading its weight
DIRECT_READ = (f"its weight is {READ_DIRECTLY} ({{op}}), outside a call of the layer: a sparse layer would "
               "compute with its dense weight there")


# where torch's modules and this library's stand-ins for them (SparseMultiheadAttention...) live
_LIBRARY = ("torch.", "sparsify.prepare.hidden", "sparsify.prepare.open_transformer")


def _user_code(root: nn.Module) -> bool:
    """Whether ``root``'s eval forward may run code other than graphs and torch's or this library's
    own modules, which read only their own weights or those :mod:`sparsify.prepare.hidden` handles
    (a MultiheadAttention's projections): a graph runs the modules it calls, such a module (a
    container) all its children. A graph whose guard holds ``self.training`` flags may run its
    module's own forward.

    >>> _user_code(nn.Sequential(nn.Linear(2, 2))), _user_code(fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2))))
    (False, False)
    >>> class Net(nn.Sequential):
    ...     pass
    >>> _user_code(nn.Sequential(Net(nn.Linear(2, 2)))), _user_code(fx.symbolic_trace(Net(nn.Linear(2, 2))))
    (True, False)
    """
    todo, seen = [root], set()
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, fx.GraphModule) and not getattr(m.__dict__.get("_call_guard"), "modes", None):
            todo.extend(m.get_submodule(n.target) for n in m.graph.nodes if n.op == "call_module")
        elif not type(m).__module__.startswith(_LIBRARY) or isinstance(m, fx.GraphModule):
            return True
        else:
            todo.extend(m.children())
    return False


def direct_reads(root: nn.Module, names: list[str], example_inputs) -> dict[str, str]:
    """``{layer: reason}`` for the layers ``names`` whose weight some op received outside the
    layer's own call in one eval forward of ``root`` on ``example_inputs``; ``{}`` without example
    inputs, when only graphs and torch's modules run (nothing to watch: no forward), or when that
    forward fails (the caller's checks report it).

    >>> import torch.nn.functional as F
    >>> class Mixer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj, self.gate, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    ...     def forward(self, x):  # gate is called, and its weight read as well
    ...         return F.linear(x, self.proj.weight) + self.gate(x) @ self.gate.weight * x.shape[0]
    >>> found = direct_reads(Mixer(), ["gate", "proj", "unused"], (torch.zeros(1, 4),))
    >>> sorted(found), found["proj"]
    (['gate', 'proj'], 'its weight is read directly by the code around it (linear), outside a call of the layer: a sparse layer would compute with its dense weight there')
    """
    if not names or example_inputs is None or not _user_code(root):
        return {}
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    layers = {n: w for n in names if isinstance(w := getattr(root.get_submodule(n), "weight", None), torch.Tensor)}
    named = {id(w): n for n, w in layers.items()}
    seen: dict[str, str] = {}  # layer -> the first op seen reading its weight

    def note(weight, func):
        seen.setdefault(named[id(weight)], getattr(func, "__name__", None) or str(func))

    mode = ParamReads(root, note, watched=list(layers.values()))
    try:
        with torch.no_grad():
            run_eval(root, [inputs], tuple, None, [], context=lambda: mode)
    except Exception:
        return {}
    finally:
        mode.remove()
    return {n: DIRECT_READ.format(op=op) for n, op in seen.items()}


def direct_warning(found: dict[str, str]) -> str:
    """One line for every layer :func:`direct_reads` found.

    >>> direct_warning({"a.proj": DIRECT_READ.format(op="linear")})[:62]
    'sparsify: 1 layer stays dense: the code around it reads its we'
    """
    names = sorted(found)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    one = len(names) == 1
    return (f"sparsify: {len(names)} layer{'' if one else 's'} stay{'s' if one else ''} dense: the code around "
            f"{'it reads its weight' if one else 'them reads their weights'} directly, outside the "
            f"layer's own calls ({shown}), so a sparse layer would compute with its dense weight there; see sparsify.plan")
