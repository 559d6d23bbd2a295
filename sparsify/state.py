"""The state a sparsified model carries: step counter, method groups, resolved recipe.

It is a submodule of the returned model (``model.sparsify_state``) so ``state_dict()`` carries the
step and every group buffer, and ``load_state_dict`` into a fresh ``sparsify`` of the same model
and recipe resumes exactly.
"""
from __future__ import annotations

import json
import warnings

import torch
from torch import nn

__all__ = ["SparsifyState", "STATE_ATTR", "find_state", "unwrap"]

STATE_ATTR = "sparsify_state"


class SparsifyState(nn.Module):
    """Holds ``step`` (optimizer steps taken), the groups (``groups``, by rule) and the recipe."""

    def __init__(self, recipe_json: str, total_steps: int | None, graph_paths: list[str]):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.groups = nn.ModuleDict()
        self.recipe_json = recipe_json
        self.total_steps = total_steps
        self.graph_paths = list(graph_paths)
        self.plan = None  # the Plan made at sparsify time (not saved)
        self._example_inputs = None  # tensors used for shapes and the finalize check (not saved)
        self.guess_inputs_later = False  # guess example_inputs from the model on first use
        self.layer_factors: dict[str, float] = {}  # MACs per weight element, per layer
        self.warned: set[str] = set()

    @property
    def example_inputs(self):
        """The example inputs given to ``sparsify`` or, when none were, a guessed single sample
        (see :func:`sparsify.macs.guess_example_inputs`), worked out on first use."""
        root = self.__dict__.get("_factor_root")
        if self._example_inputs is None and self.guess_inputs_later and root is not None:
            from .macs import guess_example_inputs
            self.guess_inputs_later = False
            self._example_inputs = guess_example_inputs(root)
        return self._example_inputs

    @example_inputs.setter
    def example_inputs(self, value) -> None:
        self._example_inputs = value

    @property
    def layer_factors(self) -> dict[str, float]:
        """Output positions per sample (MACs per weight element) of each Conv/Linear, by name.

        Measured by one eval-mode forward on ``example_inputs`` the first time something asks
        (``report``), not inside ``sparsify()``, which then costs about a trace and a copy.
        """
        if self._layer_factors is None:
            self._layer_factors = self._measure_factors()
        return self._layer_factors

    @layer_factors.setter
    def layer_factors(self, value: dict[str, float] | None) -> None:
        self._layer_factors = value

    def measure_factors_later(self, root: nn.Module, hidden_names: list[str]) -> None:
        """Measure ``layer_factors`` on ``root`` when first needed (``root`` is not registered)."""
        object.__setattr__(self, "_factor_root", root)
        self._hidden_names = list(hidden_names)
        self._layer_factors = None

    def _measure_factors(self) -> dict[str, float]:
        from .hidden import hidden_positions
        from .macs import positions_per_sample
        root, inputs = self.__dict__.get("_factor_root"), self.example_inputs
        if root is None or inputs is None:
            return {}
        try:
            # the model may have moved (model.cuda()) since the inputs were given
            device = next(root.parameters()).device
            inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
            factors = positions_per_sample(root, inputs)
            factors.update(hidden_positions(root, inputs, getattr(self, "_hidden_names", [])))
            return factors
        except Exception as exc:  # MACs are a report column, never a reason to stop training
            warnings.warn(f"sparsify: could not run the example inputs to count MACs ({type(exc).__name__}: "
                          f"{exc}); the report shows no MACs")
            return {}

    @property
    def recipe(self) -> dict:
        return json.loads(self.recipe_json)

    def get_extra_state(self):
        return {"recipe": self.recipe_json, "total_steps": self.total_steps}

    def set_extra_state(self, state) -> None:
        if state["recipe"] != self.recipe_json or state["total_steps"] != self.total_steps:
            raise RuntimeError(
                "this checkpoint was made with a different recipe or total_steps than the model it is "
                "loaded into; build the model with the same sparsify(...) call before load_state_dict. "
                f"checkpoint total_steps={state['total_steps']}, model total_steps={self.total_steps}")

    def extra_repr(self) -> str:
        return f"step={int(self.step)}, groups={list(self.groups)}"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel",
                                      "FullyShardedDataParallel") and hasattr(model, "module"):
            model = model.module
    return model


def find_state(model: nn.Module, *, required: bool = True) -> SparsifyState | None:
    """The :class:`SparsifyState` of a model returned by ``sparsify`` (wrappers allowed)."""
    state = getattr(unwrap(model), STATE_ATTR, None)
    if state is None and required:
        raise TypeError("this model was not made by sparsify.sparsify(...): call "
                        "model = sparsify.sparsify(model, recipe) first")
    return state
