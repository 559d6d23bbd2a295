"""fx-sparsify: sparse training for any PyTorch model through torch.fx graph rewriting.

>>> import torchvision, sparsify
>>> model = sparsify.sparsify(torchvision.models.resnet18(), "st3", total_steps=1000)

The public names load on first use (PEP 562), so ``import sparsify`` alone does not import torch:
the ``sparsify`` command answers ``--help`` at once, and a Ctrl-C while torch loads is the command's
one-line "interrupted", not a traceback.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "sparsify": "sparsify.api", "plan": "sparsify.api", "step": "sparsify.api", "sync": "sparsify.api",
    "penalty": "sparsify.api", "report": "sparsify.api", "finalize": "sparsify.api",
    "param_groups": "sparsify.api", "measure": "sparsify.stats.measure",
    "load_recipe": "sparsify.prepare.recipe", "builtin_recipes": "sparsify.prepare.recipe",
    "RecipeError": "sparsify.prepare.recipe", "ScheduleError": "sparsify.core.schedules",
    "FinalizeError": "sparsify.deploy.finalize", "FinalizeWarning": "sparsify.deploy.finalize",
}
__all__ = list(_PUBLIC)

if TYPE_CHECKING:
    from sparsify.api import finalize, param_groups, penalty, plan, report, sparsify, step, sync
    from sparsify.core.schedules import ScheduleError
    from sparsify.deploy.finalize import FinalizeError, FinalizeWarning
    from sparsify.prepare.recipe import RecipeError, builtin_recipes, load_recipe
    from sparsify.stats.measure import measure


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
