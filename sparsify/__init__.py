"""fx-sparsify: sparse training for any PyTorch model through torch.fx graph rewriting.

>>> import torchvision, sparsify
>>> model = sparsify.sparsify(torchvision.models.resnet18(), "st3", total_steps=1000)
"""
from sparsify.api import finalize, param_groups, penalty, plan, report, sparsify, step, sync
from sparsify.stats.measure import measure
from sparsify.deploy.finalize import FinalizeError, FinalizeWarning
from sparsify.prepare.recipe import RecipeError, builtin_recipes, load_recipe
from sparsify.core.schedules import ScheduleError

__version__ = "0.1.0"
__all__ = ["sparsify", "plan", "step", "sync", "penalty", "report", "finalize", "param_groups", "measure",
           "load_recipe", "builtin_recipes", "RecipeError", "ScheduleError", "FinalizeError", "FinalizeWarning"]
