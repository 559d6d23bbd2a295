"""Generic torch.fx rewriting machinery: tracing with fallbacks, node names and globs, rewrite
primitives that return the Change they made, a networkx view of graphs, and a pass pipeline.
Nothing here knows about sparsity."""
from .graph_view import compute_nodes, first_and_last, to_networkx
from .ends import model_ends
from .pipeline import Pipeline, PassResult, propagate_shapes
from .rewrite import (Change, copy_chain, insert_after, insert_call, remove_node, replace_module, replace_uses,
                      reroute_input, reroute_later_reads, set_call, set_submodule, unique_name)
from .select import Glob, compile_glob, is_depthwise, is_grouped, kernel_size_in, node_name, target_module
from .tracing import Fallback, TraceResult, module_path_of, trace
from .export_capture import ExportCaptureError, export_trace
from .reproduce import kept_state, reproduces, same_outputs
from .own_calls import own_calls

__all__ = [
    "trace", "TraceResult", "Fallback", "module_path_of", "export_trace", "ExportCaptureError",
    "node_name", "target_module", "compile_glob", "Glob", "is_grouped", "is_depthwise", "kernel_size_in",
    "replace_module", "insert_after", "insert_call", "reroute_input", "reroute_later_reads", "replace_uses", "remove_node", "copy_chain",
    "set_call", "set_submodule", "unique_name", "Change",
    "to_networkx", "compute_nodes", "first_and_last", "model_ends",
    "Pipeline", "PassResult", "propagate_shapes", "reproduces", "same_outputs", "kept_state", "own_calls",
]
