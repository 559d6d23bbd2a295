"""What a user changed in a sparsified model after ``sparsify`` returned it, said once per model by
``step``, ``report`` and ``finalize``: layers replaced (timm's ``reset_classifier``, PEFT adapters,
``resize_token_embeddings``) and an EMA / SWA copy ``sync`` never updated.

Apart from :mod:`sparsify.api` so that the public functions read as what they do; the warnings'
``stacklevel=3`` still points at the caller of the public function (the same two frames).
"""
from __future__ import annotations

import warnings

from torch import nn

from sparsify.core.averaging import unsynced_warning
from sparsify.core.state import check_filled, find_state, forget_replaced, unwrap


def _forget_replaced(model: nn.Module, where: str) -> None:
    """Layers the user replaced after ``sparsify`` leave their groups, said once per model (and a
    model materialized from ``meta`` without its state's values is refused)."""
    state = find_state(model, where=f"sparsify.{where}")
    check_filled(state, where)
    root = unwrap(model)
    gone = forget_replaced(root, state)
    if gone:
        key = "replaced:" + ",".join(gone)
        if key not in state.warned:
            state.warned.add(key)
            names = f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}"
            # (a name forget_replaced returns resolves: the layer now there replaced the member)
            if any(type(root.get_submodule(n)).__module__.split(".")[0] == "peft" for n in gone):
                warnings.warn(f"sparsify.{where}: {names} wrapped by PEFT adapters after sparsify() (get_peft_model, "
                              "LoRA): a wrapped sparse layer leaves the schedule, report and finalize, and the "
                              "adapter's update is dense; merge the adapters and sparsify after "
                              "(docs/integrations.md#peft-lora)", stacklevel=3)
                return
            warnings.warn(f"sparsify.{where}: {names} replaced after "
                          "sparsify() (as timm's reset_classifier does), or given a weight of another shape (as "
                          "transformers' resize_token_embeddings does): the new layer stays dense and the sparse "
                          "one it replaced leaves the schedule, report and finalize; to sparsify the new layer, "
                          "replace it before calling sparsify()", stacklevel=3)


def _check_averaged(model: nn.Module, where: str) -> None:
    """An EMA / SWA wrapper that sync never updated: said once per model."""
    msg = unsynced_warning(model, where)
    state = find_state(model)
    if msg and "unsynced" not in state.warned:
        state.warned.add("unsynced")
        warnings.warn(msg, stacklevel=3)
