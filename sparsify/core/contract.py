"""The method contract: what a sparsification method is, for the rest of the library.

A method file (``sparsify/methods/st3.py``, ``sparsify/methods/sas/``, ...) holds its layer
modules (built on :mod:`sparsify.core.layers`), a :class:`Method` subclass (its parameters and
defaults, how it rewrites one matched :class:`Site`) and the :class:`Group` that owns per-step
state. Every hook a group may implement is declared on :class:`Group` with its default; the rest of
the library calls the hooks, never ``getattr`` with a default.

Per-step state (thresholds, masks, schedule position) lives in buffers of the member modules and
of the group, so ``state_dict()`` carries all of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from passes import Change, insert_after, replace_module, reroute_input, set_submodule

from sparsify.core.conv1d import Conv1DLike, grouped_transpose
from sparsify.core.layers import WEIGHT_TYPES, SparseWeightMixin, weight_base
from sparsify.core.plain import plain_copy
from sparsify.core.params import Params
from sparsify.core.schedules import resolve_time
from sparsify.core.subclasses import computed_weight_reason, refusal

__all__ = ["Method", "Group", "Site", "GroupContext", "HOOKED"]

#: what a method's reason for a layer it leaves dense because a rewrite would bypass or change the
#: caller's module hooks says (SAS's rewiring past a hooked relu); ``sparsify`` warns about them
HOOKED = "left dense for the hooks registered on"

# --------------------------------------------------------------------------------------------
# rewriting one matched site
# --------------------------------------------------------------------------------------------

@dataclass
class Site:
    """One matched place in a graph, handed to :meth:`Method.apply`.

    ``name`` is the qualified name from the model root (a module's path for ``call_module``
    nodes, ``<graph path>.<node name>`` otherwise). Methods edit the graph only through the
    helpers here, which log what they change and register the modules the group will manage.
    ``gm`` and ``node`` are ``None`` for layers reached outside any graph (inside an untraceable
    submodule): then only :meth:`replace` is possible.
    """

    name: str
    module: nn.Module | None
    gm: fx.GraphModule | None = None
    node: fx.Node | None = None
    prefix: str = ""  # qualified name of ``gm`` from the model root
    root: nn.Module | None = None
    members: dict[str, nn.Module] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    params: dict = field(default_factory=dict)  # the winning rule's resolved params (for accepts)

    def qualify(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local

    def replace(self, new: nn.Module) -> nn.Module:
        """Put ``new`` where the matched module was, keeping its qualified name."""
        if self.node is not None:
            self.changes.append(replace_module(self.gm, self.node, new))
        else:
            set_submodule(self.root, self.name, new)
            self.changes.append(Change("replace", self.name, f"{type(self.module).__name__} -> "
                                       f"{type(new).__name__} (attribute swap)"))
        self.members[self.name] = new
        return new

    def insert_after(self, module: nn.Module, suffix: str, node: fx.Node | None = None) -> fx.Node:
        """Call ``module`` on the output of ``node`` (default: the site's node); all former users
        of that output read the new node. Its qualified name is ``<site name>_<suffix>`` placed
        next to the site's module (or in the graph's root for function nodes)."""
        if self.gm is None:
            raise RuntimeError(f"{self.name}: cannot insert nodes outside a traced graph")
        node = node if node is not None else self.node
        base = str(node.target) if node.op == "call_module" else node.name
        local = f"{base}_{suffix}".replace(".", "_") if node.op != "call_module" else f"{base}_{suffix}"
        new_node, change = insert_after(self.gm, node, module, local)
        self.changes.append(change)
        self.members[self.qualify(str(new_node.target))] = module
        return new_node

    def reroute(self, user: fx.Node, old: fx.Node, new: fx.Node) -> None:
        """Make ``user`` read ``new`` where it read ``old``."""
        self.changes.append(reroute_input(user, old, new))


# --------------------------------------------------------------------------------------------
# per-step state
# --------------------------------------------------------------------------------------------

@dataclass
class GroupContext:
    """What a group may need beyond its params: the model root and the training length."""

    root: nn.Module
    total_steps: int | None = None
    stages: list[dict] = field(default_factory=list)  # the recipe's "stages" block, unresolved
    example_inputs: tuple | None = None  # inputs used for shapes (None when unknown)
    guessed: bool = False  # example_inputs are sparsify's guess (an image at 224²), not the caller's

    def time(self, value, what: str) -> int | None:
        """Resolve a recipe time (steps, or a fraction of ``total_steps``) to a step index."""
        return resolve_time(value, self.total_steps, what=what)

    def ramp(self, params: dict, method: str) -> tuple[int, int]:
        """The ``(begin, end)`` steps of a schedule's ramp, checked to be in order."""
        begin, end = self.time(params["begin"], "begin"), self.time(params["end"], "end")
        if end < begin:
            raise ValueError(f"{method}: end ({end}) is before begin ({begin})")
        return begin, end

    def stage(self, name: str) -> tuple[int, int | None]:
        """``(begin, end)`` steps of the recipe stage called ``name`` (end None: open-ended)."""
        for st in self.stages:
            if st.get("name") == name:
                return (self.time(st["begin"], f"stages[{name}].begin"),
                        self.time(st.get("end"), f"stages[{name}].end"))
        known = ", ".join(repr(st.get("name")) for st in self.stages) or "none"
        raise ValueError(f"unknown stage {name!r}: the recipe's stages block defines {known}")


class Group(nn.Module):
    """The modules one rule's method created, with the state they share (e.g. a global threshold).

    Members are referenced, not registered, so their parameters appear once in ``state_dict``
    (under their own qualified names). Subclasses override what they need.
    """

    def __init__(self, method: "Method", params: dict, members: dict[str, nn.Module], ctx: GroupContext):
        super().__init__()
        self.method_name = method.name
        self.params = dict(params)
        object.__setattr__(self, "members", dict(members))

    # -- called by sparsify.step --------------------------------------------------------
    def refuse_step(self) -> str | None:
        """The one-line error that refuses this ``sparsify.step`` (e.g. semi-structured masks after
        a training forward at another resolution), else None. Asked of every group before the
        step counter or any group moves, so that a caller who catches the error and goes on gets
        the run the refused step never happened in."""
        return None

    def update(self, step: int, loss: float | None = None) -> None:
        """Advance to optimizer step ``step`` (recompute thresholds, masks, ...)."""

    def reads_weights(self, step: int) -> bool:
        """Whether :meth:`update` at ``step`` reads (or writes) its members' parameters. Under
        FSDP2 ``sparsify.step`` all-gathers them for it (:mod:`sparsify.core.sharded`), so a
        group says False on the steps that leave them alone (e.g. between GMP's pruning steps)."""
        return True

    def writes_weights(self, step: int) -> bool | None:
        """Whether :meth:`update` at ``step`` writes its members' weights in place (ST-3's fix,
        the ``l1-prune`` step). ``sparsify()`` runs step 0: weights written there get their own
        copy first, so that the caller's model, which shares the other tensors, is left as it was.
        ``None`` (the default): not said. A group with its own :meth:`update` then gets a copy of
        every tensor of the caller's that its members hold, for step 0, and keeps only the copies
        step 0 changed (the rest are shared again); saying False (or True on the steps it writes)
        saves that copy."""
        return None

    def penalty(self) -> torch.Tensor | float | None:
        """The regularization term recorded since the last call (then forgotten): a scalar tensor
        (a number is taken as a constant), or None."""
        return None

    def clear(self) -> None:
        """Drop anything recorded during the last forward (called by ``sparsify.step``)."""

    def warnings(self) -> list[str]:
        """Problems to tell the user about after a step (each message is warned once per model)."""
        return []

    def build_warnings(self) -> list[str]:
        """Problems known once the group is built, warned by ``sparsify()`` (e.g. semi-structured
        masks that round to every position of a map at the example input's size); a message also
        returned by :meth:`warnings` later is not said again (both are said once per model)."""
        return []

    # -- optimizer -----------------------------------------------------------------------
    def param_options(self, weight_decay: float) -> list[tuple[list[nn.Parameter], dict]]:
        """Optimizer groups this method needs, as ``(parameters, options)`` (e.g. STR's thresholds
        with their own weight decay); ``weight_decay`` is the caller's. The parameters listed
        here leave the default groups of :func:`sparsify.param_groups`."""
        return []

    # -- reporting -----------------------------------------------------------------------
    def target(self, step: int) -> float | None:
        """The scheduled target sparsity at ``step`` (None when the method has none)."""
        return self.params.get("sparsity")

    def final_target(self) -> float | None:
        """The target sparsity at the end of the schedule (None when the method has none)."""
        return self.params.get("sparsity")

    def describe(self, step: int) -> dict:
        """Group-level facts for the report (phase, threshold, ...)."""
        return {}

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        """Extra per-layer facts for the report; weight sparsity is measured by the report.
        ``factor``: the layer's output positions per sample (MACs per weight element), when known."""
        return {}

    # -- deployment ----------------------------------------------------------------------
    def finalize_member(self, name: str, module: nn.Module) -> nn.Module | None:
        """The plain module that replaces ``module``; ``None`` removes the node (its input is
        used instead). Default: a plain layer with :meth:`SparseWeightMixin.deployed_weight`; a
        plain Conv/Linear (a method that prunes layers in place) as it is; any other module (an
        inserted identity such as a regularizer) removed."""
        if isinstance(module, SparseWeightMixin):
            return plain_copy(module)
        if isinstance(module, WEIGHT_TYPES):
            return module
        return None


@dataclass
class NoParams(Params):
    """A method without parameters."""


class Method:
    """A sparsification method as recipes name it: subclass, decorate with
    :func:`sparsify.methods.register`, and declare the params as a nested ``Params`` dataclass.

    ``site`` says what a rule's ``match`` selects for this method: ``"module"`` nodes calling
    one of ``targets`` (Conv/Linear), or ``"node"``: any graph node (activations, for
    regularizers and masks). ``Params`` (a :class:`~sparsify.core.params.Params` dataclass) types
    every parameter a rule may set, with its default and range; ``params`` (the defaults) and
    ``schedule_keys`` (its ``time=True`` fields, which the recipe's ``schedule`` block fills) are
    derived from it.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    site: ClassVar[str] = "module"
    targets: ClassVar[tuple[type, ...]] = WEIGHT_TYPES
    Params: ClassVar[type[Params]] = NoParams
    params: ClassVar[dict[str, Any]] = {}
    group_class: ClassVar[type[Group]] = Group
    schedule_keys: ClassVar[tuple[str, ...]] = ()  # params that the recipe's "schedule" block fills
    needs_example_inputs: ClassVar[bool] = False  # True: the group sizes buffers from input shapes at build
    full_trace: ClassVar[bool] = False  # True: rewrites read the nodes around a site (trace every module holding one)
    inserts_after: ClassVar[bool] = False  # True: apply inserts nodes after the site's call (needs its graph)
    # what finalize's modules hold that the dense model's class does not build, said when the finalized
    # model is saved with save_pretrained, whose from_pretrained rebuilds the class ("": nothing; None:
    # undeclared, and the kept modules that are not plain Conv/Linear layers are named instead)
    deploy_layout: ClassVar[str | None] = None
    # what the model in training holds in place of weights of the class's shapes (None: the class's
    # weights, masks and thresholds as extra entries), said when it is saved with save_pretrained:
    # from_pretrained into the plain class refuses such a folder rather than giving the dense model
    training_layout: ClassVar[str | None] = None
    # a layer whose weight another module registers too (sparsify.prepare.tied): "share" (the rewritten
    # layer computes with an effective weight of the same shape from the same parameter, which the other
    # uses can read), "refuse" (the rewrite changes the weight), "keep" (the layer keeps its weight)
    tied_weights: ClassVar[str] = "share"
    # a Conv/Linear subclass with its own forward (timm's Conv2dSame, StdConv2d; sparsify.core.subclasses):
    # "run" (the sparse layer runs that forward with its effective weight where it uses the weight as is),
    # "keep" (the layer itself is not replaced), "dense" (leave every such layer dense)
    own_forward: ClassVar[str] = "dense"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if why := cls.Params.refusal():  # said here, where the method is written, not by a recipe later
            raise TypeError(f"method {cls.name or cls.__name__!r}: {why}")
        cls.params = cls.Params.defaults()
        cls.schedule_keys = cls.Params.time_keys()

    def check(self, params: dict) -> list[tuple[str, str]]:
        """Problems with ``params`` (every param of the method) as ``(param name, message)``."""
        return self.Params.problems(params)

    def out_channel_state(self, params: dict) -> bool:
        """Whether a layer rewritten with ``params`` (defaults filled in) keeps state or structure
        per output channel (a scale, a threshold, blocks or groups read in the ``(out, in, ...)``
        layout): then a grouped ConvTranspose, whose output channels are no weight dimension,
        stays dense."""
        return False

    def accepts(self, site: Site) -> str | None:
        """None when this method can rewrite ``site``, else why not (shown by ``plan``)."""
        if self.site == "module" and not isinstance(site.module, self.targets):
            names = ", ".join(getattr(t, "label", t.__name__) for t in self.targets)
            if isinstance(site.module, Conv1DLike):
                return f"{self.name} applies to {names} only, not to transformers' Conv1D (a transposed Linear)"
            return f"{self.name} applies to {names} only"
        if self.site == "module" and (computed := computed_weight_reason(site.module)):
            return computed
        if self.site == "module" and self.own_forward != "keep":
            why = refusal(site.module, weight_base(site.module), self.own_forward == "run")
            if why:
                return why
        if self.site == "module" and grouped_transpose(site.module) and \
                self.out_channel_state({**self.params, **(site.params or {})}):
            return (f"{self.name} works per output channel and a {type(site.module).__name__} with "
                    f"groups={site.module.groups} holds its output channels across two weight dimensions "
                    "(in, out/groups, ...): left dense")
        return None

    def apply(self, site: Site, params: dict) -> None:
        """Rewrite ``site``; every module created must go through ``site.replace`` /
        ``site.insert_after`` so the group gets it."""
        raise NotImplementedError(f"method {self.name!r} ({type(self).__name__}) has no apply(site, params): "
                                  "define it to rewrite each site with site.replace or site.insert_after")

    def make_group(self, params: dict, members: dict[str, nn.Module], ctx: GroupContext) -> Group:
        return self.group_class(self, params, members, ctx)
