"""Activation regularizers: Transformed-ℓ1 (Yu & Tian 2024), ℓ1 and Hoyer-square (as in SparseML).

A regularizer is a node inserted into the graph after the activation it regularizes. It returns
its input unchanged (the very same tensor, so outputs are bit-identical) and, in training mode
with autograd on, records ``λ · reduce(f(x))`` in float32. ``sparsify.penalty(model)`` pops and
sums the records of the last forward(s); ``sparsify.step`` forgets whatever was not collected,
so no autograd graph outlives its step. See docs/methods/tl1.md.

Placement (param ``placement``): ``"post"`` regularizes the matched node's output (the default
recipe matches every activation call: ReLU, ReLU6, SiLU, GELU, Hardswish); ``"pre"`` regularizes
the matched node's input (the pre-activation). Explicit node names are rules matching by
``name``. The network input (a placeholder) is never regularized.

The penalty functions (kernels.py) are custom autograd functions that keep only the
input tensor (already kept alive by the activation's own backward) for the backward pass, allocate
nothing activation-sized in the forward and only the returned gradient in the backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn


from sparsify.core.extra_state import pack, unpack
from sparsify.core.contract import Group, GroupContext, Method, Site
from sparsify.core.registry import register
from sparsify.core.forwards import entered
from sparsify.core.params import Literal, Params, param
from sparsify.core.buffers import eager
from sparsify.core.eval_loop import in_internal
from sparsify.core.records import RecordsGroupMixin, RecordsMixin
from sparsify.methods.regularizers.in_place import make_users_out_of_place, written_through_alias
from sparsify.methods.regularizers.kernels import hoyer_square, l1_sum, plain_penalty, tl1_sum
from sparsify.core.staging import active_range, in_range, resolve_stages, stage_at

__all__ = ["tl1", "tl1_grad", "ActivationRegularizer", "ActivationRegGroup", "TL1Method",
           "ActivationL1Method", "HoyerSquareMethod", "penalty_value", "produces_nonnegative",
           "ACTIVATION_TYPES", "ACTIVATION_OPS"]

# what the built-in recipes regularize: every common activation, as modules and as functions
ACTIVATION_TYPES = ["ReLU", "ReLU6", "SiLU", "GELU", "Hardswish", "LeakyReLU", "PReLU", "Mish"]
ACTIVATION_OPS = ["relu", "relu6", "silu", "gelu", "hardswish", "leaky_relu", "prelu", "mish"]
REDUCTIONS = ("sum", "mean", "batchmean")


def tl1(x: torch.Tensor, a: float) -> torch.Tensor:
    """Transformed-ℓ1 per element: ``ρ_a(x) = (1 + a)|x| / (a + |x|)``.

    >>> tl1(torch.tensor([0.0, 1.0, 3.0]), 1.0)
    tensor([0.0000, 1.0000, 1.5000])
    """
    t = x.abs()
    return (1.0 + a) * t / (a + t)


def tl1_grad(x: torch.Tensor, a: float) -> torch.Tensor:
    """``dρ_a/dx = a(1 + a)·sign(x) / (a + |x|)²``.

    >>> tl1_grad(torch.tensor([0.5]), 0.5)
    tensor([0.7500])
    """
    d = a + x.abs()
    return (a * (1.0 + a)) * torch.sign(x) / (d * d)


_NONNEG_MODULES = (nn.ReLU, nn.ReLU6)
_NONNEG_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu6}
_NONNEG_METHODS = {"relu", "relu_"}


def produces_nonnegative(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output is >= 0 by construction (a ReLU/ReLU6 call): the penalty then skips ``abs``.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> [produces_nonnegative(gm, n) for n in gm.graph.nodes if n.op == "call_module"]
    [False, True]
    """
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _NONNEG_MODULES)
    if node.op == "call_function":
        return node.target in _NONNEG_FUNCTIONS
    return node.op == "call_method" and node.target in _NONNEG_METHODS


def penalty_value(x: torch.Tensor, function: str, a: float = 1.0, reduction: str = "mean", *,
                  weight: float = 1.0, nonneg: bool = False) -> torch.Tensor:
    """The penalty of one activation map times ``weight`` (float32 scalar, differentiable).

    ``reduction``: ``"sum"`` over every element of the batch (the paper's formula), ``"mean"``
    (divided by the number of elements) or ``"batchmean"`` (divided by the batch size).
    ``nonneg=True`` promises ``x >= 0`` (a ReLU output) and saves a pass. Computed by the
    low-allocation kernels of :mod:`sparsify.methods.regularizers.kernels` (float32 arithmetic for
    float32/bfloat16/float16 maps; float64 maps stay float64).

    >>> penalty_value(torch.tensor([0.0, 1.0, 3.0]), "tl1", a=1.0, reduction="sum")
    tensor(2.5000)
    """
    scale = float(weight)
    if reduction == "mean":
        scale /= max(x.numel(), 1)
    elif reduction == "batchmean":
        scale /= max(x.shape[0] if x.dim() else 1, 1)
    if not eager():  # a tracer or compiler: plain ops it understands, same value
        return plain_penalty(x, function, a, scale)
    if function == "tl1":
        return tl1_sum(x, a, scale, nonneg)
    if function == "l1":
        return l1_sum(x, scale, nonneg)
    if function == "hoyer":
        return hoyer_square(x, scale, nonneg)
    raise ValueError(f"unknown penalty function {function!r}")


class ActivationRegularizer(RecordsMixin, nn.Module):
    """Identity node that records ``lam · penalty_value(x)`` during training-mode forwards.

    Nothing is recorded in eval mode, with autograd off (``torch.no_grad()``), outside the
    rule's active steps (``active`` False), or for non-floating-point values. ``records`` holds
    the recorded scalars until :meth:`pop` (called through ``sparsify.penalty``) or
    :meth:`clear_records` (``sparsify.step``).
    """

    calls_entered = True  # its forward calls sparsify.core.forwards.entered (no pre-hook needed)
    identity_in_eval = True  # records nothing outside training: a CallGuard need not warn
    returns_input = True  # graph analyses (SAS's relu search) may look through it

    def __init__(self, function: str = "tl1", lam: float = 1.0, a: float = 1.0, reduction: str = "mean",
                 placement: str = "post", regularizes: str = "", nonneg: bool = False):
        super().__init__()
        self.function, self.lam, self.a, self.reduction = function, float(lam), float(a), reduction
        self.placement, self.regularizes = placement, regularizes
        self.nonneg = bool(nonneg)  # the regularized value is a ReLU output: no abs needed
        # a later op writes into the value through a view (in_place.written_through_alias): the
        # penalty's backward reads a copy (set by the method's apply; structure, not state)
        self.copies_input = False
        self.active = True
        self.records: list[torch.Tensor] = []
        # zeros among the values seen by the eval-mode forwards of the last evaluation: since the
        # last eval() call or training forward (the measured activation sparsity the report shows;
        # not state)
        self.zeros = self.seen = 0
        self._counting = False
        # a training forward ran since the counts were taken: the report says the figure is old
        self.stale = False

    def train(self, mode: bool = True):
        if not mode:  # model.eval(): the next eval-mode forward starts a new evaluation
            self._counting = False
        return super().train(mode)

    def loaded(self) -> None:
        # the counts are of the weights being replaced: the next eval-mode forward starts a new
        # evaluation (it averaged the two), and until then the report says the figure is old
        super().loaded()
        self._counting, self.stale = False, True

    def forward(self, x):
        entered(self, x)  # another tracer would drop the term: record() is no graph op
        if (self.active and self.lam != 0.0 and isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()
                and self.recording()):
            value = x.clone() if self.copies_input else x
            self.record(penalty_value(value, self.function, self.a, self.reduction, weight=self.lam, nonneg=self.nonneg))
        if self.training:
            self._counting, self.stale = False, True  # stores only: a read would be guarded on under compile
        elif isinstance(x, torch.Tensor) and x.numel() and eager() and not in_internal():
            if not self._counting:  # a new evaluation: forget the previous one
                self.zeros = self.seen = 0
                self._counting, self.stale = True, False
            self.zeros += x.numel() - int(torch.count_nonzero(x))
            self.seen += x.numel()
        return x

    # the active flag follows the step; keep it in state_dict so a resumed run is exact
    def get_extra_state(self):
        return pack({"active": self.active}, like={"active": False})

    def set_extra_state(self, state) -> None:
        self.active = bool(unpack(state).get("active", True))

    def extra_repr(self) -> str:
        extra = f", a={self.a:g}" if self.function == "tl1" else ""
        return (f"{self.function}, lam={self.lam:g}{extra}, reduction={self.reduction}, "
                f"placement={self.placement}, active={self.active}")


class ActivationRegGroup(RecordsGroupMixin, Group):
    """Every regularizer node of one rule: switches them on in their step range, collects penalties."""

    record_noun = "regularizers"

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.begin, self.end = active_range(params, ctx, method.name)
        self._stages = resolve_stages(ctx)  # plain data: a group keeps no reference to the model
        self._init_records()

    def update(self, step: int, loss=None) -> None:
        on = in_range(step, self.begin, self.end)
        for m in self.members.values():
            m.active = on

    def writes_weights(self, step: int) -> bool:
        return False  # it switches its nodes on and off: sparsify() copies none of the caller's tensors

    def target(self, step: int):
        return None

    def final_target(self):
        return None

    def describe(self, step: int) -> dict:
        p = self.params
        out = {"function": self.method_name, "lam": p["lam"], "reduction": p["reduction"],
               "placement": p["placement"], "active": in_range(step, self.begin, self.end),
               "begin": self.begin, "end": self.end, "nodes": len(self.members)}
        if "a" in p:
            out["a"] = p["a"]
        if self._stages:
            out["stage"] = stage_at(self._stages, step)
        return out

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        # measured zeros of the regularized activation in the last evaluation (None before one)
        return {"regularizes": module.regularizes, "placement": module.placement, "sparsifies": "activations",
                "achieved": module.zeros / module.seen if module.seen else None, "elements": module.seen,
                **({"stale": module.stale} if module.seen else {})}

    def finalize_member(self, name: str, module: nn.Module):
        return None  # the node is removed: its users read its input again


@dataclass
class RegularizerParams(Params):
    window_only = True
    lam: float = param(0.01, "Weight of the penalty in the loss (sparsify.penalty).", ge=0)
    reduction: Literal[REDUCTIONS] = param("mean", "How the per-element penalty is reduced over the tensor.")
    placement: Literal["post", "pre"] = param("post", "Regularize the node's output (post) or its input (pre).",
                                              what="'post' (the node's output) or 'pre' (its input)")
    begin: float = param(0, "Step where the penalty starts.", time=True)
    end: float | None = param(None, "Step where it stops (null: never).", time=True)
    stage: str | None = param(None, "Name of a recipe stage whose range replaces begin/end (null: none).")


@dataclass
class TL1Params(RegularizerParams):
    lam: float = param(0.01, "Weight of the penalty in the loss (sparsify.penalty).", ge=0)
    a: float = param(1.0, "Shape of rho_a(x) = (1+a)|x|/(a+|x|): small a approaches l0, large a l1.", gt=0)


@dataclass
class HoyerParams(RegularizerParams):
    lam: float = param(1e-4, "Weight of the penalty in the loss (sparsify.penalty).", ge=0)


class _ActivationRegMethod(Method):
    """Shared by the three regularizer methods; ``function`` picks the penalty. Params
    (:class:`RegularizerParams`): ``lam`` (weight in the loss), ``reduction`` (``"sum"``,
    ``"mean"``, ``"batchmean"``), ``placement`` (``"post"``: the node's output, ``"pre"``: its
    input), ``begin`` / ``end`` (null: never ends) or ``stage``."""

    site = "node"
    function = "tl1"
    group_class = ActivationRegGroup
    Params = RegularizerParams

    @staticmethod
    def _regularized_node(site: Site, placement: str) -> fx.Node | None:
        if placement == "post":
            return site.node
        first = site.node.args[0] if site.node.args else None
        return first if isinstance(first, fx.Node) else None

    def accepts(self, site: Site) -> str | None:
        if site.node is None or site.gm is None:
            return "inside an untraceable submodule: no graph to insert a regularizer node into"
        if site.node.op not in ("call_module", "call_function", "call_method"):
            return f"{site.node.op} nodes are not regularized"
        placement = site.params.get("placement", self.params["placement"])
        target = self._regularized_node(site, placement)
        if target is None:
            return "its input is not a graph value (placement 'pre')"
        if target.op in ("placeholder", "get_attr"):
            return "the network input and constants are never regularized"
        if target.op == "call_module" and isinstance(site.gm.get_submodule(target.target), ActivationRegularizer):
            return "already regularized"
        if any(u.op == "call_module" and isinstance(site.gm.get_submodule(u.target), ActivationRegularizer)
               for u in target.users):
            return "already regularized by an earlier site"
        return None

    def apply(self, site: Site, params) -> None:
        target = self._regularized_node(site, params["placement"])
        reg = ActivationRegularizer(self.function, params["lam"], params.get("a", 1.0), params["reduction"],
                                    params["placement"], regularizes=target.name,
                                    nonneg=produces_nonnegative(site.gm, target))
        new = site.insert_after(reg, self.name.replace("-", "_"), node=target)
        site.changes.extend(make_users_out_of_place(site.gm, new))
        reg.copies_input = written_through_alias(new)


@register
class TL1Method(_ActivationRegMethod):
    """Recipe method ``tl1`` (docs/methods/tl1.md): Transformed-ℓ1 on activations. Params
    (:class:`TL1Params`): ``lam`` (0.01), ``a`` (1.0, > 0), ``reduction`` ("mean"),
    ``placement`` ("post"), ``begin`` (0), ``end`` (null), ``stage`` (null)."""

    name = "tl1"
    description = "Transformed-ℓ1 activation regularizer ρ_a(x) = (1+a)|x|/(a+|x|) (Yu & Tian 2024)"
    function = "tl1"
    Params = TL1Params


@register
class ActivationL1Method(_ActivationRegMethod):
    """Recipe method ``activation-l1``: λ·Σ|x| on activations. Params (:class:`RegularizerParams`):
    ``lam`` (0.01), ``reduction`` ("mean"), ``placement`` ("post"), ``begin`` (0), ``end`` (null),
    ``stage`` (null)."""

    name = "activation-l1"
    description = "ℓ1 activation regularizer λ·Σ|x| (SparseML's 'l1')"
    function = "l1"
    Params = RegularizerParams


@register
class HoyerSquareMethod(_ActivationRegMethod):
    """Recipe method ``activation-hoyer``: λ·(Σ|x|)²/Σx² on activations. Params
    (:class:`HoyerParams`): ``lam`` (1e-4), ``reduction`` ("mean"), ``placement`` ("post"),
    ``begin`` (0), ``end`` (null), ``stage`` (null)."""

    name = "activation-hoyer"
    description = "Hoyer-square activation regularizer λ·(Σ|x|)²/Σx² (SparseML's 'hs', DeepHoyer)"
    function = "hoyer"
    Params = HoyerParams
