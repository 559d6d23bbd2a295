"""The sparsification methods, one module (or package) each, and the registry recipes use.

Adding a method:

1. one file ``sparsify/methods/<name>.py`` (or a folder): its layer modules (built on
   :mod:`sparsify.core.layers`), a ``Params`` dataclass (typed params with defaults, ranges and
   one-line docs: :mod:`sparsify.core.params`), its :class:`~sparsify.core.contract.Group` (per-step
   state; override the hooks it needs: ``update``, ``penalty``, ``target``, ``describe``,
   ``layer_stats``, ``finalize_member``, ``warnings``, ``param_options``, ...) and a
   :class:`~sparsify.core.contract.Method` subclass decorated with
   :func:`~sparsify.core.registry.register`, whose docstring lists its params;
2. one import line below (importing the module registers the method), then
   ``python -m sparsify.prepare.schema`` to regenerate the recipe schema;
3. a recipe ``sparsify/recipes/<name>.json`` and a docs page ``docs/methods/<name>.md``.

docs/writing-a-method.md walks through an example (and a method registered from a user's own module).
"""
from __future__ import annotations

from sparsify.core.contract import Group, GroupContext, Method, Site
from sparsify.core.layers import SparseWeightMixin, specialize, weight_base
from sparsify.core.plain import plain_copy
from sparsify.core.registry import REGISTRY, get_method, register

# importing a method's module registers it (the order is the one `sparsify recipes` lists)
from sparsify.methods.st3 import ST3Method
from sparsify.methods.str import STRMethod
from sparsify.methods.magnitude import MagnitudeMethod
from sparsify.methods.nm import NMMethod
from sparsify.methods.regularizers import ActivationL1Method, HoyerSquareMethod, TL1Method
from sparsify.methods.semistructured import SemiStructuredMethod
from sparsify.methods.dual import L1PruneMethod
from sparsify.methods.sas import SASMethod

#: the methods this package defines (a user's method may be registered before this import)
BUILT_IN = frozenset(type(m) for m in REGISTRY.values() if type(m).__module__.startswith(__name__ + "."))

__all__ = ["BUILT_IN", "REGISTRY", "get_method", "register", "Method", "Group", "GroupContext", "Site",
           "SparseWeightMixin", "specialize", "plain_copy", "weight_base", "ST3Method", "STRMethod",
           "MagnitudeMethod", "NMMethod", "TL1Method", "ActivationL1Method", "HoyerSquareMethod",
           "SemiStructuredMethod", "L1PruneMethod", "SASMethod"]
