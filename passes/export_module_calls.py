"""The ATen graph of ``torch.export`` brought back to the level the rest of the library reads
(:func:`passes.export_capture.export_trace` runs these three passes in this order): torch leaf
module calls collapsed into ``call_module`` nodes of the original modules
(:func:`_collapse_leaves`), the ``training`` flag the trace fixed in dropout / batch_norm ops read
at run time (:func:`_live_modes`), ATen activations called through their ``torch`` functions
(:func:`_torch_level`)."""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


_OPS = torch.ops.aten
# ATen activations called through the torch function the rest of the library recognises
_AS_TORCH = {_OPS.relu.default: torch.relu, _OPS.relu_.default: torch.relu_, _OPS.gelu.default: F.gelu,
             _OPS.silu.default: F.silu, _OPS.sigmoid.default: torch.sigmoid, _OPS.tanh.default: torch.tanh,
             _OPS.hardswish.default: F.hardswish, _OPS.hardsigmoid.default: F.hardsigmoid,
             _OPS.mish.default: F.mish}
# op -> index of its ``training`` argument
_MODE_ARGS = {_OPS.dropout.default: 2, _OPS.feature_dropout.default: 2, _OPS.alpha_dropout.default: 2,
              _OPS.feature_alpha_dropout.default: 2, _OPS.batch_norm.default: 5}


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    """``(call key, module path)`` of the innermost module call that created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return key, path


def _is_torch_leaf(m: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(m, "") and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _collapse_leaves(gm: fx.GraphModule) -> int:
    """Replace the ops of each torch leaf module call by one ``call_module`` node (see the module
    docstring); returns how many calls were collapsed."""
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and (where := _innermost(node)) is not None and where[1]:
            groups.setdefault(where[0], []).append(node)
    done = 0
    for key, nodes in groups.items():
        path = _innermost(nodes[0])[1]
        try:
            module = gm.get_submodule(path)
        except AttributeError:
            continue
        if not _is_torch_leaf(module):
            continue
        inside = set(nodes)
        owned = path + "."
        inputs, outputs = [], []
        for n in nodes:
            for a in n.all_input_nodes:
                own_state = a.op == "get_attr" and str(a.target).startswith(owned)
                if a not in inside and not own_state and a not in inputs:
                    inputs.append(a)
            if any(u not in inside for u in n.users):
                outputs.append(n)
        if len(inputs) != 1 or len(outputs) != 1:
            continue  # several inputs (attention) or outputs (LSTM): the ops stay as they are
        out = outputs[0]
        with gm.graph.inserting_after(out):
            call = gm.graph.call_module(path, (inputs[0],))
        call.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})
        out.replace_all_uses_with(call)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
        done += 1
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "call_module" or n.is_impure())
    return done


def _live_modes(gm: fx.GraphModule) -> None:
    """Make the ``training`` argument of dropout / batch_norm ops read the owning module's flag."""
    for node in list(gm.graph.nodes):
        index = _MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if index is None or len(node.args) <= index or not isinstance(node.args[index], bool):
            continue
        if node.target is _OPS.batch_norm.default and node.args[3] is None:
            continue  # no running statistics: batch statistics in both modes
        path = (_innermost(node) or ("", ""))[1]
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            # a bool attribute read at run time, as passes.tracing reads `self.training`
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            flag = gm.graph.get_attr(f"{path}.training" if path else "training")
        node.args = node.args[:index] + (flag,) + node.args[index + 1:]


def _torch_level(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _AS_TORCH:
            node.target = _AS_TORCH[node.target]
