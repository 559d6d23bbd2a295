"""Finalize's edits that leave plain torch modules in the copied model: a removed member's call
dropped from its graph, tied users made plain modules sharing their owner's weight, and traced
modules given their own classes back. Kept out of finalize.py, which orders the steps and checks
the outputs: these only edit the module tree, reading no sparse state beyond graph paths and
fingerprints."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from passes import remove_node, set_submodule
from passes.calls import CallShell
from passes.traced import graph_fingerprint, untraced

from sparsify.core.state import SparsifyState
from sparsify.core.tied import TiedUse, plain_tied


def _remove_node(root: nn.Module, graph_paths: list[str], qualname: str) -> bool:
    """Drop the call of module ``qualname`` from its graph: its users read its input instead."""
    for prefix in graph_paths:
        if prefix and not qualname.startswith(prefix + "."):
            continue  # else a cut-off name ("...conv.2_tl1" under a longer prefix: "1") hits another node
        gm = root.get_submodule(prefix) if prefix else root
        if not isinstance(gm, fx.GraphModule):
            continue
        local = qualname[len(prefix) + 1:] if prefix else qualname
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target == local:
                remove_node(gm, node, delete_module=True)
                gm.graph.lint()
                gm.recompile()
                return True
    return False


def _untrace(final: nn.Module, state: SparsifyState) -> nn.Module:
    """Give each traced module whose finalized graph is the graph as captured (the weight and
    regularizer recipes: layers swapped back, inserted nodes removed) its own class back, running
    its own forward (:func:`passes.traced.untraced`; an activation's one-call shell gives back the
    activation): the finalized model is then the user's classes and torch's layers only, and
    pickles without fx-sparsify. Graphs a recipe changed for
    good (SAS's rewiring, semi-structured's masks) stay graphs. Deepest first, the root last."""
    for prefix in sorted(state.graph_paths, key=lambda p: (p.count(".") + bool(p), p), reverse=True):
        gm = final.get_submodule(prefix) if prefix else final
        if not isinstance(gm, fx.GraphModule) or state.graph_fingerprints.get(prefix) != graph_fingerprint(gm.graph):
            continue
        # an activation's one-call graph (passes.calls.call_shell) gives back the activation it calls
        plain = gm.get_submodule(gm.shell_of) if isinstance(gm, CallShell) else untraced(gm)
        if plain is None:
            continue
        if prefix:
            set_submodule(final, prefix, plain)
        else:
            final = plain
    return final


def _finalize_tied(final: nn.Module) -> None:
    """Tied users (:mod:`sparsify.core.tied`) become plain modules registered with their finalized
    owner's parameter, which holds the deployed weight: the tie is kept."""
    made: dict[int, nn.Module] = {}  # a module registered under several names stays one module
    for name, m in list(final.named_modules(remove_duplicate=False)):
        if isinstance(m, TiedUse):
            if id(m) not in made:
                made[id(m)] = plain_tied(m, final.get_submodule(m.tied_to).weight)
            set_submodule(final, name, made[id(m)])
