"""What a weight-averaged copy (EMA, SWA) of a sparsified model takes from the training model.

The tools that keep such a copy average every floating-point parameter and treat the rest their
own way: torch's ``AveragedModel`` copies the buffers (``use_buffers=False``) or averages them
(``True``); timm's ``ModelEmaV3`` copies integer and bool buffers and averages float ones;
``ModelEmaV2`` averages every ``state_dict`` entry, so a bool mask becomes the union of every mask
so far and the step counter a truncated mean. None of them calls ``set_extra_state``, so Python
state (a regularizer's active flag, a generator) stays where it was when the copy was made.

A mask, a threshold computed from the weights, a schedule step is not a quantity to average: the
averaged model should compute with the training model's sparsity, applied to its own averaged
weights. :func:`sync_sparsity` copies exactly that part, the buffers and extra state of the
library's modules and of every method's groups, layers and inserted modules (a method written
outside the library too), through the modules' own loading (which re-shapes lazily sized maps
and sets the Python flags that follow a buffer). Learned parameters (STR's thresholds, SAS's
weights) are parameters: the averaging tool averages them, and the method computes from the
averages. See docs/averaging.md.
"""
from __future__ import annotations

import warnings

from torch import nn

from sparsify.core.layers import SparseWeightMixin, drop_all_caches
from sparsify.core.state import find_state, partial_load
from sparsify.core.wrappers import is_wrapper, unwrap

__all__ = ["sparsity_entries", "sync_sparsity", "unsynced_warning"]


def _is_library_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "sparsify"


def _sparsity_owners(model: nn.Module) -> set[str]:
    """Names of the modules whose buffers and extra state are sparsity: the library's own, the
    state and its groups, and every group's members and inserted modules, whatever their class's
    module (a method written outside the library: its layers made with ``specialize`` and its group
    classes live in the user's module)."""
    state = find_state(model, required=False)
    ids = {id(m) for m in state.modules()} if state is not None else set()
    if state is not None:
        ids |= {id(m) for m in state.members()}
    return {name for name, module in model.named_modules(remove_duplicate=False)
            if _is_library_module(module) or id(module) in ids}


def sparsity_entries(model: nn.Module) -> dict:
    """The ``state_dict`` entries that hold ``model``'s sparsity: the buffers and extra state of
    the library's modules and of every method's (sparse layers, inserted nodes, groups, the step),
    not the parameters.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=10)
    >>> sorted(sparsity_entries(m))
    ['0.mask', 'sparsify_state._extra_state', 'sparsify_state.groups.rule0_magnitude._extra_state', \
'sparsify_state.groups.rule0_magnitude.tau', 'sparsify_state.step']
    """
    owners = _sparsity_owners(model)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {key: value for key, value in model.state_dict().items()
            if key not in parameters and key.rpartition(".")[0] in owners}


def sync_sparsity(averaged: nn.Module, model: nn.Module) -> None:
    """Copy ``model``'s sparsity (:func:`sparsity_entries`) into ``averaged``, a copy of it whose
    parameters some tool averages; see the module docstring."""
    target, source = unwrap(averaged), unwrap(model)
    if target is source:
        raise ValueError("sparsify.sync: the averaged model and the training model are the same module; "
                         "pass the EMA / SWA copy first and the model it averages second")
    mine, theirs = find_state(target), find_state(source)
    # reversed arguments would write the averaged (e.g. unioned) masks into the training model
    if (is_wrapper(model) and not is_wrapper(averaged)) or int(theirs.step) < int(mine.step):
        raise ValueError(f"sparsify.sync: the arguments look reversed (the second is at step {int(theirs.step)}, "
                         f"the first at {int(mine.step)}): pass the EMA / SWA copy first and the model it "
                         "averages second, sparsify.sync(ema, model)")
    if mine.recipe_json != theirs.recipe_json or mine.total_steps != theirs.total_steps:
        raise ValueError("sparsify.sync: the averaged model was sparsified with another recipe or total_steps "
                         "than the training model; make it as a copy of the sparsified model "
                         "(AveragedModel(model), ModelEmaV3(model), copy.deepcopy(model))")
    entries = sparsity_entries(source)
    unknown = sorted(set(entries) - set(target.state_dict()))
    if unknown:
        raise ValueError(f"sparsify.sync: the averaged model has no {unknown[0]!r} ({len(unknown)} entries "
                         "missing): it is not a copy of the training model")
    layers = [(name, m) for name, m in target.named_modules() if isinstance(m, SparseWeightMixin)]
    before = [m.before_sync() for _, m in layers]
    with partial_load():  # the sparsity entries only, on purpose
        target.load_state_dict(entries, strict=False)
    for (name, m), b in zip(layers, before):
        m.after_sync(b, source.get_submodule(name))
    mine.synced = True  # after the load, which brought the training model's (False)
    drop_all_caches(target)  # the averaging tool wrote its weights in place
    if "sync lag" not in mine.warned and (msg := lag_warning(layers, int(theirs.step))):
        mine.warned.add("sync lag")  # once per averaged copy
        warnings.warn(msg, stacklevel=3)


def lag_warning(layers: list[tuple[str, nn.Module]], step: int, share: float = 0.1) -> str | None:
    """What to say when, in a synced averaged copy, ``share`` or more of the weights the training
    model keeps are turned into something else by the copy's own values (:meth:`averaged_lag`):
    the average lags the model's sparsity schedule by more than its thresholds allow (ST-3 with
    a decay whose horizon is a large part of the run: an EMA at chance accuracy beside a model at
    99%), else None."""
    lagging = kept = 0
    for _, m in layers:
        lag = m.averaged_lag()
        if lag is not None:
            lagging, kept = lagging + lag[0], kept + lag[1]
    if not kept or lagging < share * kept:
        return None
    return (f"sparsify.sync: at step {step}, {lagging:,} of the {kept:,} weights the training model keeps are at or "
            "below its threshold in the averaged copy, whose soft threshold turns their sign: the average lags the "
            "sparsity schedule (an averaging horizon, 1 / (1 - decay) steps, long against the run) and computes "
            "something else than the model; use a smaller decay, or start averaging when the masks are fixed "
            "(ST-3's fix step) (docs/averaging.md)")


def unsynced_warning(model: nn.Module, where: str) -> str | None:
    """What to say when ``model`` is an averaging wrapper whose copy ``sparsify.sync`` never
    updated (its masks are whatever the tool made of them), else None.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=10)
    >>> ema = torch.optim.swa_utils.AveragedModel(m)
    >>> unsynced_warning(ema, "report").split(":")[0]
    'sparsify.report'
    >>> unsynced_warning(sparsify.sync(ema, m), "report") is None
    True
    """
    if not is_wrapper(model) or find_state(model).synced:
        return None
    return (f"sparsify.{where}: this {type(model).__name__} was never given the training model's sparsity: "
            "its masks and thresholds are what the averaging made of them (a bool mask averages to the union "
            "of all masks so far); call sparsify.sync(ema, model) after each update of the average "
            "(docs/averaging.md)")
