"""Opening with ``LightningModule.load_from_checkpoint`` a checkpoint whose network
``SparsifyCallback(recipe, attr=...)`` sparsified at ``setup``: the module's ``__init__`` builds it
dense, and the saved sparse ``state_dict`` would not load (docs/integrations.md). And the refusal,
when the callback has sparsified the module already, of a checkpoint of another run."""
from __future__ import annotations

import json

import lightning.pytorch as pl  # noqa: F401  (the doctest's LightningModule)
from torch import nn

import sparsify
from sparsify.core.extra_state import unpack
from sparsify.core.load_check import run_difference
from sparsify.core.state import STATE_ATTR, find_state, saved_states

__all__ = ["sparsify_as_saved", "refuse_other_run"]


def sparsify_as_saved(pl_module: nn.Module, checkpoint: dict, **sparsify_kwargs) -> list[str]:
    """Sparsify each submodule of a freshly built (dense) ``pl_module`` that ``checkpoint`` holds
    sparsified, with the recipe and ``total_steps`` saved in it, so that its ``state_dict`` loads:
    call it from ``on_load_checkpoint`` to open with ``load_from_checkpoint`` a checkpoint written
    by ``SparsifyCallback(recipe, attr=...)``. ``sparsify_kwargs`` (``example_inputs=``) go to
    ``sparsify.sparsify``. Returns the names of the submodules it sparsified.

    >>> class Classifier(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(4, 4))
    ...     def on_load_checkpoint(self, checkpoint):
    ...         sparsify_as_saved(self, checkpoint)
    >>> trained = Classifier()
    >>> trained.net = sparsify.sparsify(trained.net, "gmp", sparsity=0.5, total_steps=10)
    >>> checkpoint = {"state_dict": trained.state_dict()}
    >>> fresh = Classifier()
    >>> sparsify_as_saved(fresh, checkpoint)
    ['net']
    >>> fresh.load_state_dict(checkpoint["state_dict"])
    <All keys matched successfully>
    """
    state_dict = checkpoint.get("state_dict", checkpoint)
    done, made = [], []
    for path, key in saved_states(state_dict):
        if any(path == d or path.startswith(d + ".") for d in done):
            continue  # inside a module sparsified whole
        done.append(path)
        module = pl_module.get_submodule(path)
        if find_state(module, required=False) is not None:
            continue  # sparsified already (in __init__, or by SparsifyCallback's setup when resuming)
        if not path:
            raise TypeError(f"sparsify_as_saved: the checkpoint holds {type(pl_module).__name__} itself sparsified; "
                            "sparsify the network it holds (self.net), not the LightningModule")
        saved = unpack(state_dict[key])
        parent, _, name = path.rpartition(".")
        setattr(pl_module.get_submodule(parent), name, sparsify.sparsify(
            module, json.loads(saved["recipe"]), total_steps=saved["total_steps"], **sparsify_kwargs))
        made.append(path)
    return made


def refuse_other_run(checkpoint: dict, state, recipe, attr: str, kwargs: dict) -> None:
    """Refuse a ``checkpoint`` whose ``pl_module.<attr>`` another run trained (``state``: the one the
    callback's ``SparsifyCallback(recipe, attr=attr, **kwargs)`` sparsified), naming what to pass."""
    saved = checkpoint.get("state_dict", {}).get(f"{attr}.{STATE_ATTR}._extra_state")
    if saved is None or not (why := run_difference(saved, state.recipe_json, state.total_steps)):
        return
    # (load_state_dict would refuse it too, telling the user to build the model, which this callback does)
    total = unpack(saved)["total_steps"]
    same = run_difference(saved, state.recipe_json, total) is None
    estimated = total != state.total_steps and "total_steps" not in kwargs
    raise RuntimeError(f"SparsifyCallback: the checkpoint's pl_module.{attr} was trained in another run ({why}"
                       f"{', from the Trainer' if estimated else ''}); nothing "
                       "was loaded: to resume it, pass SparsifyCallback("
                       + (f"{recipe!r}" if same else "<its recipe and overrides>")
                       + f", attr={attr!r}, total_steps={total})")
