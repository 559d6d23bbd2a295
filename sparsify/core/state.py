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

from passes import set_submodule

from sparsify.core.extra_state import pack, unpack
from sparsify.core.load_check import prefixed_line, run_difference
from sparsify.core.load_warnings import partial_load, warn_partial, warn_unrecorded
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.moved_inputs import _moved_like, _off_meta
from sparsify.core.wrong_model import check_module, not_sparsified
from sparsify.core.plain import plain_copy
from sparsify.core.sharded import full_parameters
# AVERAGING_WRAPPERS and is_wrapper were defined here before wrappers.py: they stay importable from here
from sparsify.core.wrappers import AVERAGING_WRAPPERS, is_wrapper, unwrap  # noqa: F401

__all__ = ["SparsifyState", "STATE_ATTR", "AVERAGING_WRAPPERS", "find_state", "unwrap", "after_load",
           "forget_replaced", "check_filled", "refuse_unfilled", "is_wrapper",
           "start_groups", "partial_load", "saved_states"]

STATE_ATTR = "sparsify_state"


class SparsifyState(nn.Module):
    """Holds ``step`` (optimizer steps taken), the groups (``groups``, by rule) and the recipe."""

    def __init__(self, recipe_json: str, total_steps: int | None, graph_paths: list[str]):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._stepped = 0  # ``step`` as this process's last sparsify.step or load left it (not saved)
        self.groups = nn.ModuleDict()
        self.recipe_json = recipe_json
        self.total_steps = total_steps
        self.graph_paths = list(graph_paths)
        self.graph_fingerprints: dict[str, str] = {}  # each graph as captured (passes.traced.graph_fingerprint)
        self.plan = None  # the Plan made at sparsify time (not saved)
        self.example_inputs = None  # tensors used for shapes and the finalize check (not saved)
        self.guess_inputs_later = False  # guess example_inputs from the model on first use (stats)
        self.hidden_names: list[str] = []  # layers whose weights are read outside module calls
        self.output_layers: list[str] = []  # rewritten last compute layers (sparsify.core.dead_outputs)
        self.frozen_dense: list[str] = []  # layers a rule matched, left dense as frozen (core.step_checks)
        self.layer_factors: dict[str, float] | None = None  # MACs per weight element by layer (stats)
        self.macs_missing = ""  # why no input ran to count MACs, for the report (stats.macs)
        self.warned: set[str] = set()
        self.build_said: list[str] = []  # what the groups' build_warnings() returned, for sparsify() (not saved)
        self.first_weights = None  # (step, largest |w| per sparse layer) at the first check (core.weight_growth)
        self.synced = False  # an averaged copy that sparsify.sync gave a model's sparsity (saved)
        self.unfilled = False  # sparsified on meta, then materialized: the state holds no values
        self.stepped_here = False  # sparsify.step ran on this model in this process (sparsify.prepare.sharing)
        self.in_trainer = False  # SparsifyTrainerCallback's Trainer runs: its save_pretrained calls are checkpoints
        self.load_prefix: str | None = None  # this model's key prefix in the state_dict being loaded (load_hooks)

    def forward(self, x, *args, **kwargs):
        """The identity: a model whose own forward calls each of its children in turn (an
        ``nn.Sequential`` run eagerly, sentence-transformers' ``SentenceTransformer``) passes
        its input through the state it now holds as it did before."""
        return x

    @property
    def recipe(self) -> dict:
        return json.loads(self.recipe_json)

    def members(self) -> list[nn.Module]:
        """Every group's members (the sparse layers and the modules the recipe inserted), group
        by group."""
        return [m for g in self.groups.values() for m in g.members.values()]

    def get_extra_state(self):
        return pack({"recipe": self.recipe_json, "total_steps": self.total_steps, "synced": self.synced},
                    like={"recipe": self.recipe_json, "total_steps": self.total_steps, "synced": False})

    def set_extra_state(self, state) -> None:
        # the model's own pre-hook (load_hooks.before_load) refuses first; this is for the state loaded alone
        why = run_difference(state, self.recipe_json, self.total_steps)
        if why:
            raise RuntimeError(f"load_state_dict: this checkpoint was made by another sparsify(...) call than the "
                               f"model it is loaded into ({why}); build the model with the same recipe, overrides "
                               "and total_steps before load_state_dict")
        state = unpack(state)
        self.synced = bool(state.get("synced", False))
        self.unfilled = False  # a checkpoint's state is in (load_state_dict sets buffers before this)

    def _apply(self, fn, recurse=True):
        # to_empty() (meta-device initialisation) gives the step, masks and thresholds memory but
        # no values: nothing may use them until a checkpoint fills them (see check_filled)
        was_meta = self.step.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.step.is_meta:
            self.unfilled = True
            self.example_inputs = _off_meta(self.example_inputs, self.step.device)
        elif not self.step.is_meta:
            # finalize's check and the MAC counts run these: a model moved to the GPU or cast to
            # bf16 after sparsify() takes inputs moved and cast alike
            self.example_inputs = _moved_like(self.example_inputs, fn)
        return out

    def extra_repr(self) -> str:
        return f"step={int(self.step)}, groups={list(self.groups)}"


def after_load(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of a sparsified model, for a checkpoint that holds no sparsify
    state (saved from the model before ``sparsify``: a pretrained or dense checkpoint).

    The missing key says so and what to do, so that torch's own error reads right under
    ``strict=True``. And the model is made what ``sparsify`` of the loaded weights would have
    made: at step 0 every group's step-0 update runs again on the new weights (N:M's masks, ST-3's
    thresholds, ... were computed from the weights the model had), so that ``sparsify(model)``
    then ``load_state_dict(dense, strict=False)`` equals ``sparsify`` of the loaded model. Past
    step 0 the masks and thresholds stay those of the earlier weights (a schedule's history cannot
    be redone): a warning says so, leaving out a key whose tensor the checkpoint holds under another
    name (a tied head transformers leaves out of its folders). A sparsified checkpoint without its
    record of recipe and ``total_steps`` (its step loaded, its ``_extra_state`` missing) is no dense
    one: it is loaded as it is, and a warning says it went unchecked."""
    missing = incompatible_keys.missing_keys
    key = f"{STATE_ATTR}._extra_state"
    dense = False
    state = getattr(module, STATE_ATTR, None)
    state = state if isinstance(state, SparsifyState) else None
    if state is not None and not state.step.is_meta:  # a load sets the counter (core.advance compares)
        state.__dict__["_stepped"] = int(state.step)
    for i, k in enumerate(missing):
        if k == key or k.endswith("." + key):
            if line := prefixed_line(k, [s for _, s in saved_states(incompatible_keys.unexpected_keys)]):
                missing[i] = f"{k} ({line})"
                warnings.warn(f"load_state_dict: {line}", stacklevel=3)  # strict=False loaded nothing
                continue
            if k[:-len("_extra_state")] + "step" not in missing:  # its step was loaded: a sparsified checkpoint
                missing[i] = f"{k} (the checkpoint's sparsify state was loaded without this record of its recipe)"
                warn_unrecorded(state, k)
                continue
            dense = True
            missing[i] = (f"{k} (this checkpoint holds no sparsify state: it was saved from a model before "
                          "sparsify(); load it with strict=False to take its weights into the sparsified "
                          "model, or save the sparsified model's own state_dict)")
    if not dense and state is not None and not state.step.is_meta and int(state.step) > 0:
        warn_partial(module, state, missing)
    if not dense or state is None or state.unfilled or state.step.is_meta:
        return  # a model materialized from meta stays refused until a sparsified checkpoint fills it
    step = int(state.step)
    if step == 0:
        start_groups(state)
    else:
        warnings.warn(f"sparsify: weights loaded from a checkpoint without sparsify state into a model at step "
                      f"{step}: its masks and thresholds stay those computed from its earlier weights; to start "
                      "sparse training from these weights, load them before the first sparsify.step (or call "
                      "sparsify() on the loaded model)", stacklevel=3)


def find_state(model: nn.Module, *, required: bool = True, where: str = "sparsify",
               what: str = "model") -> SparsifyState | None:
    """The :class:`SparsifyState` of a model returned by ``sparsify`` (wrappers allowed);
    ``where`` and ``what`` name the function and argument in the errors."""
    check_module(model, where, what)
    root = unwrap(model)
    state = getattr(root, STATE_ATTR, None)
    if state is None and required:
        inner = [name for name, m in root.named_modules() if STATE_ATTR in m._modules]
        if inner:  # the user sparsified a part (a backbone) and passes the whole model
            shown = ", ".join(f"`{n}`" for n in inner[:3]) + (f" (and {len(inner) - 3} more)"
                                                               if len(inner) > 3 else "")
            raise TypeError(f"{where}: this model was not made by sparsify.sparsify(...), but holds models it made at "
                            f"{shown}: pass each of those (sparsify.step(model.{inner[0]}), the same for penalty, "
                            "report, finalize), or sparsify the whole model with a recipe that leaves the rest dense "
                            "(a rule {\"match\": {\"name\": \"head.**\"}, \"method\": null}, docs/recipes.md#rules)")
        raise TypeError(not_sparsified(root, where, what))
    return state


def saved_states(state_dict) -> list[tuple[str, str]]:
    """``(module path, key)`` of each sparsify state a ``state_dict`` (or a list of its keys) holds,
    outermost first (the path ``""``: a model sparsified whole).

    >>> saved_states({"net.sparsify_state._extra_state": 0, "net.0.weight": 1})
    [('net', 'net.sparsify_state._extra_state')]
    """
    suffix = f"{STATE_ATTR}._extra_state"
    keys = sorted((k for k in state_dict if k == suffix or k.endswith("." + suffix)), key=len)
    return [(k[:-len(suffix)].rstrip("."), k) for k in keys]


def forget_replaced(root: nn.Module, state: SparsifyState) -> list[str]:
    """Drop from the groups the members the model no longer holds at their name, and return those
    names: a layer replaced after ``sparsify`` (timm's ``model.reset_classifier(5)`` puts a new
    ``nn.Linear`` where the sparse head was). The new layer is the model's now: it stays as it is
    (dense), and the old one no longer counts in thresholds, ``report`` or ``finalize`` (which would
    otherwise put it back). A name that does not resolve is kept (nothing is known to replace it).
    A member whose weight was replaced by one of another shape (transformers'
    ``resize_token_embeddings`` re-ties a resized embedding's weight into the LM head) is one too:
    its masks and thresholds no longer fit, and it becomes the plain layer holding that weight.

    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "st3", total_steps=10)
    >>> m[0] = torch.nn.Linear(4, 2)
    >>> forget_replaced(m, find_state(m))
    ['0']
    """
    gone = []
    for group in state.groups.values():
        for name, member in list(group.members.items()):
            try:
                now = root.get_submodule(name)
            except AttributeError:
                continue
            resized = now is member and isinstance(member, SparseWeightMixin) and member.resized()
            if resized:
                set_submodule(root, name, plain_copy(member, share=True))
            if now is not member or resized:
                del group.members[name]
                # its name keeps its room in the group's extra state (core/keep.py: an EMA copy made
                # before the swap holds a tensor of the size with it)
                group.__dict__.setdefault("_held_room", set()).add(name)
                gone.append(name)
    return gone


def check_filled(state: SparsifyState, where: str) -> None:
    """Refuse to use a state that was made on the ``meta`` device and then given memory without
    values (``to_empty``): its masks, thresholds and step counter would be whatever that memory
    held. A ``load_state_dict`` of a sparsified model's checkpoint fills it.

    >>> import torch, sparsify
    >>> with torch.device("meta"):
    ...     net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> m = sparsify.sparsify(net, "gmp", total_steps=10, example_inputs=torch.zeros(1, 4, device="meta"))
    >>> m = m.to_empty(device="cpu")
    >>> check_filled(find_state(m), "step")
    Traceback (most recent call last):
    ...
    RuntimeError: sparsify.step: this model was sparsified on the meta device and then materialized ...
    """
    if state.unfilled:
        raise RuntimeError(
            f"sparsify.{where}: this model was sparsified on the meta device and then materialized (to_empty), "
            "which gives its masks, thresholds and step counter memory but no values; load the state_dict of "
            "a sparsified checkpoint into it, or call sparsify() on the model after materializing and "
            "initializing its weights (docs/distributed.md#meta-device-initialization)")


def refuse_unfilled(module: nn.Module, args) -> None:
    """Forward pre-hook of a model sparsified on ``meta``: :func:`check_filled` before its forward."""
    state = getattr(module, STATE_ATTR, None)
    if state is not None:
        check_filled(state, "forward")


@torch.no_grad()  # as sparsify.step runs the later ones (core/advance.py): an update writing weights in place works at 0 too
def start_groups(state: SparsifyState) -> None:
    """Every group's step-0 update, as ``sparsify()`` ends and when a dense checkpoint is loaded at
    step 0 (:func:`after_load`; under FSDP2 the groups see the whole weights), without autograd.
    On a ``meta`` model a method that reads the weights' values there (ST-3's thresholds, N:M's
    masks) says so in one line."""
    readers = [m for g in state.groups.values() for m in (g, *g.members.values())]
    with full_parameters(readers):
        for name, group in state.groups.items():
            try:
                group.update(0, None)
            except (RuntimeError, NotImplementedError) as e:
                if not any(m.weight.is_meta for m in group.members.values() if hasattr(m, "weight")):
                    raise
                raise RuntimeError(f"sparsify: {group.method_name} ({name}) reads the weights' values when it is set "
                                   "up (its step-0 thresholds or masks), which a model on the meta device does not "
                                   "have: call sparsify() on the model after materializing and initializing its "
                                   "weights (docs/distributed.md#meta-device-initialization)") from e
