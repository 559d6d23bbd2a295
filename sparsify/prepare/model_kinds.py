"""Models ``sparsify`` refuses for what they are, before anything is traced or swapped.

* a model that holds something named ``sparsify_state`` (a layer, a parameter, a plain attribute),
  at any depth: the library keeps its state under that name, so the user's layer was overwritten
  (a model ending in a ``sparsify_state`` head returned its hidden features) or torch raised a bare
  ``KeyError``; and checkpoint tools (``to_official_state_dict``) drop every key under that name;
* a model that is an ``nn.ModuleList`` / ``nn.ModuleDict`` without a forward: the state, a child module, would become
  one of its elements (``len`` grows, iteration yields it, ``model[-1]`` raises ``KeyError``);
* a model that is itself one Conv/Linear layer: it is traced into ``F.linear(x, self.weight)``
  with no layer left to rewrite, and a layer cannot hold the state's child next to it nor the
  module a method inserts after it (wrapping it in ``nn.Sequential`` gives it one).
"""
from __future__ import annotations

from torch import nn

from sparsify.core.layers import WEIGHT_TYPES
from sparsify.core.state import STATE_ATTR

__all__ = ["refuse_model_kind"]


def _holds_state_name(module: nn.Module) -> str | None:
    """What ``module`` holds under :data:`STATE_ATTR` (a kind, in words), or None."""
    for kind, table in (("submodule", module._modules), ("parameter", module._parameters),
                        ("buffer", module._buffers)):
        if STATE_ATTR in table:
            return f"a {kind}, {type(table[STATE_ATTR]).__name__}"
    if STATE_ATTR in module.__dict__ or hasattr(type(module), STATE_ATTR):
        return "an attribute"
    return None


def refuse_model_kind(model: nn.Module) -> None:
    """Raise a one-line error for a model ``sparsify`` cannot take for what it is (module docstring).

    >>> refuse_model_kind(nn.Sequential(nn.Linear(2, 2)))
    >>> refuse_model_kind(nn.Linear(2, 2))
    Traceback (most recent call last):
      ...
    TypeError: the model is a single Linear layer: sparsify rewrites the layers a model holds and adds its state beside them; wrap it: sparsify.sparsify(nn.Sequential(layer), ...)
    >>> net = nn.Sequential(nn.Linear(2, 2)); net[0].sparsify_state = 1.0
    >>> refuse_model_kind(net)
    Traceback (most recent call last):
      ...
    ValueError: the model has its own `0.sparsify_state` (an attribute): sparsify keeps its state under that name; rename it
    """
    for name, module in model.named_modules():
        held = _holds_state_name(module)
        if held:
            where = f"{name}.{STATE_ATTR}" if name else STATE_ATTR
            raise ValueError(f"the model has its own `{where}` ({held}): sparsify keeps its state under that "
                             "name; rename it")
    # a container subclass with a forward of its own (timm's FeatureDictNet) is traced as any model
    if isinstance(model, (nn.ModuleList, nn.ModuleDict)) and type(model).forward is nn.Module.forward:
        kind = "ModuleList" if isinstance(model, nn.ModuleList) else "ModuleDict"
        seq = " (or nn.Sequential(*layers) when its layers run one after the other)" if kind == "ModuleList" else ""
        raise TypeError(f"the model is an nn.{kind} ({type(model).__name__}): the state sparsify adds as a child "
                        f"would become one of its elements; sparsify the module whose forward runs it{seq}")
    if isinstance(model, WEIGHT_TYPES):
        raise TypeError(f"the model is a single {type(model).__name__} layer: sparsify rewrites the layers a model "
                        "holds and adds its state beside them; wrap it: sparsify.sparsify(nn.Sequential(layer), ...)")
