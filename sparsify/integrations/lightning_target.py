"""What ``SparsifyCallback(recipe, attr=...)`` sparsifies itself, and whether it may: its arguments,
checked when the callback is built (a wrong one would otherwise surface only inside ``fit``);
``pl_module.<attr>``, looked up with errors that name what the module holds; and the refusal of
strategies that would sparsify it in processes other than the one that called ``fit``.

Apart from :mod:`sparsify.integrations.lightning` because these read only the callback's
arguments, the module and the trainer, none of the callback's per-run state.
"""
from __future__ import annotations

import difflib

from torch import nn

from sparsify.prepare.capture import check_capture
from sparsify.prepare.recipe import CALL_KEYWORDS, load_recipe
from sparsify.prepare.validate import check_total_steps

__all__ = ["check_arguments", "target_of", "refuse_spawned"]


def check_arguments(recipe, attr, sparsify_kwargs: dict) -> None:
    """``SparsifyCallback``'s arguments: both ``recipe`` and ``attr`` or neither, ``sparsify()``'s
    keywords only with them, and with them a loadable recipe, steps and capture."""
    if (recipe is None) != (attr is None):
        raise ValueError("give both recipe and attr (the LightningModule attribute to sparsify), or neither")
    if recipe is None and sparsify_kwargs:  # they would be ignored: nothing is sparsified here
        raise TypeError(f"SparsifyCallback: {', '.join(sorted(sparsify_kwargs))} given without recipe and attr: "
                        "sparsify()'s arguments are for the module the callback sparsifies itself")
    if recipe is not None:  # checked here: a wrong argument would otherwise surface only inside fit
        if not (isinstance(attr, str) and attr.isidentifier()):
            raise TypeError(f"SparsifyCallback: attr must be the name of the LightningModule attribute to "
                            f"sparsify (a str such as 'net'), got {attr!r}")
        load_recipe(recipe, **{k: v for k, v in sparsify_kwargs.items() if k not in CALL_KEYWORDS})
        check_total_steps(sparsify_kwargs.get("total_steps"))
        if sparsify_kwargs.get("capture") is not None:
            check_capture(sparsify_kwargs["capture"])


_MISSING = object()


def target_of(pl_module: nn.Module, attr: str) -> nn.Module:
    """``pl_module.<attr>``, or an error naming the attribute and what the module holds."""
    where = f"SparsifyCallback(attr={attr!r})"
    target = getattr(pl_module, attr, _MISSING)
    if target is _MISSING:
        close = difflib.get_close_matches(attr, [n for n, _ in pl_module.named_children()], n=1)
        raise AttributeError(f"{where}: {type(pl_module).__name__} has no attribute {attr!r}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
    if not isinstance(target, nn.Module):
        raise TypeError(f"{where}: {type(pl_module).__name__}.{attr} is {type(target).__name__}, not the "
                        "nn.Module to sparsify (build it in __init__ or in configure_model)")
    return target


def refuse_spawned(trainer, recipe, attr: str) -> None:
    """Refuse a strategy that runs ``fit`` in spawned or forked processes: what the callback
    sparsified there would come back to the calling process dense."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if hasattr(launcher, "_recover_results_in_main_process"):
        # spawned or forked processes: the module of the process that called fit stays
        # dense, and Lightning loads the trained weights into it (not strictly) at the end
        raise RuntimeError(
            f"SparsifyCallback({recipe!r}, attr={attr!r}) would sparsify inside the processes "
            f"strategy {type(trainer.strategy).__name__} ({getattr(launcher, '_start_method', '?')}) starts: "
            "the module of the process that calls fit stays dense and gets the trained weights without "
            f"their masks. Sparsify it before fit (pl_module.{attr} = sparsify.sparsify(..., "
            "total_steps=...), then SparsifyCallback()), or use strategy='ddp'")
