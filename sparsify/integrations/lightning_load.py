"""Opening with ``LightningModule.load_from_checkpoint`` a checkpoint whose network
``SparsifyCallback(recipe, attr=...)`` sparsified at ``setup``: the module's ``__init__`` builds it
dense, and the saved sparse ``state_dict`` would not load (docs/integrations.md)."""
from __future__ import annotations

import json

import lightning.pytorch as pl  # noqa: F401  (the doctest's LightningModule)
from torch import nn

import sparsify
from sparsify.core.extra_state import unpack
from sparsify.core.state import find_state, saved_states

__all__ = ["sparsify_as_saved"]


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
