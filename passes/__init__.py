"""Generic torch.fx rewriting machinery: tracing with fallbacks, selection, rewrite primitives,
a networkx view of graphs, and a pass pipeline. Nothing here knows about sparsity."""
from .graph_view import compute_nodes, feeds, first_and_last, joins, to_networkx
from .pipeline import Pipeline, PassResult, propagate_shapes
from .rewrite import Change, erase_dead, insert_after, replace_module, reroute_input, set_submodule, unique_name
from .select import (all_of, any_of, by_name, by_op, by_type, channels_between, glob_to_regex, is_depthwise,
                     is_grouped, kernel_size_in, node_name, none_of, select, target_module)
from .tracing import Fallback, TraceResult, module_path_of, trace

__all__ = [
    "trace", "TraceResult", "Fallback", "module_path_of",
    "select", "by_type", "by_op", "by_name", "all_of", "any_of", "none_of", "is_grouped", "is_depthwise",
    "kernel_size_in", "channels_between", "glob_to_regex", "node_name", "target_module",
    "replace_module", "insert_after", "reroute_input", "erase_dead", "set_submodule", "unique_name", "Change",
    "to_networkx", "compute_nodes", "first_and_last", "joins", "feeds",
    "Pipeline", "PassResult", "propagate_shapes",
]
