"""STR: soft threshold reparameterization (Kusupati et al., ICML 2020; repo RAIVNLab/STR).

Each layer computes with ``Ŵ = sign(W) ⊙ ReLU(|W| − sigmoid(s))`` where ``s`` is learned by the
optimizer like any weight (plain autograd: ``∂L/∂W = ∂L/∂Ŵ ⊙ 1[|W| > sigmoid(s)]``). Sparsity
comes from weight decay on ``W`` **and on s** (decay pulls a very negative ``s`` toward 0, which
raises the threshold). See docs/methods/str.md.

``granularity``: ``"layer"`` (one value per layer, the paper's), ``"channel"`` (one per output
channel), or ``"global"`` (one value shared by every layer of the rule; it is registered once,
on the group, as ``sparsify_state.groups.<rule>.s``). A single threshold is a 1-element tensor,
not a 0-d one (as the official ``sparseThreshold``, and because FSDP2 shards no 0-d parameter);
a 0-d ``s`` in an older checkpoint is reshaped on load. ``s`` and the sigmoid are float32 even
under autocast or after ``model.half()``.

``sparsify.param_groups(model, weight_decay)`` gives every ``s`` the decay ``threshold_decay``
(default: ``weight_decay``, as in the paper), and ``sparsify.step`` warns once when an optimizer
steps an ``s`` without weight decay (the user would get no sparsity).
"""
from __future__ import annotations

from dataclasses import dataclass

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.params import Literal, Params, param
from sparsify.core.layers import SparseWeightMixin, specialize, weight_base
from sparsify.core.buffers import eager, layer_buffers, workspace
from sparsify.core.devices import no_autocast
from sparsify.core.sharded import check_gathered, is_sharded

__all__ = ["STRMethod", "STRMixin", "str_weight", "str_threshold", "soft_threshold"]


def str_threshold(s: torch.Tensor) -> torch.Tensor:
    """``sigmoid(s)`` in float32, whatever autocast or the parameter's dtype say.

    >>> str_threshold(torch.tensor(-3200.0))
    tensor(0.)
    """
    with no_autocast(s.device.type):
        return torch.sigmoid(s.float())


def str_weight(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(W) ⊙ ReLU(|W| − threshold)`` (the threshold broadcasts: scalar or per channel).

    The plain composition: the reference :func:`soft_threshold` is tested against, and what
    layers use for reduced-precision weights and under ``torch.compile`` (which fuses it).

    >>> str_weight(torch.tensor([0.5, -0.05, -0.3]), torch.tensor(0.1))
    tensor([ 0.4000, -0.0000, -0.2000])
    """
    with no_autocast(weight.device.type):
        out = torch.sign(weight) * torch.relu(weight.abs() - threshold)
    return out.to(weight.dtype)


def _shrink(weight: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W − clamp(W, −t, t)``: equal to ``sign(W)·relu(|W| − t)`` (up to the sign of zeros:
    ``±(|W| − t)`` rounds the same either way), in one pass (two with per-channel thresholds)."""
    if threshold.numel() == 1 and weight.device.type == "cpu":
        # one kernel; float() of a CPU scalar costs no sync
        if out is None:
            return F.softshrink(weight, float(threshold))
        return torch._C._nn.softshrink(weight, float(threshold), out=out)
    t = threshold.to(weight.dtype)
    out = torch.clamp(weight, -t, t, out=out)
    return torch.sub(weight, out, out=out)


def _signed_sum(grad: torch.Tensor, sign: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``Σ grad ⊙ sign`` reduced to ``shape`` (a scalar or ``(Cout, 1, ...)``), without
    materialising the product when the layout allows a BLAS dot product."""
    with no_autocast(grad.device.type):  # a dot product is on autocast's lists
        if grad.is_contiguous() and sign.is_contiguous():
            if all(d == 1 for d in shape):
                return torch.dot(grad.reshape(-1), sign.reshape(-1)).reshape(shape)
            if shape[0] == grad.shape[0] and all(d == 1 for d in shape[1:]):
                rows = grad.shape[0]
                return torch.bmm(grad.reshape(rows, 1, -1), sign.reshape(rows, -1, 1)).reshape(shape)
        return (grad * sign).sum_to_size(shape)


class _SoftThreshold(torch.autograd.Function):
    """Autograd for ``Ŵ = sign(W) ⊙ ReLU(|W| − t)`` given ``Ŵ`` (``eff``, computed without
    history): the gradients plain autograd gives that composition, ``∂L/∂W = ∂L/∂Ŵ ⊙
    1[|W| > t]`` (ReLU'(0) = 0) and ``∂L/∂t = −Σ ∂L/∂Ŵ ⊙ sign(Ŵ)`` over the weights sharing
    ``t``. ``Ŵ ≠ 0`` exactly where ``|W| > t``, so ``Ŵ`` (which the conv saves anyway) is all
    the backward keeps.

    ``in_place``: the incoming gradient belongs to this node alone (the layer's own conv made
    it), so the weight gradient is written into it and ``sign(Ŵ)`` into a shared scratch tensor:
    no allocation. ``pinned``: the buffer's pin, released once the backward has run."""

    @staticmethod
    def forward(ctx, weight, threshold, eff, in_place: bool, pinned):
        ctx.save_for_backward(eff)
        ctx.threshold_shape, ctx.threshold_dtype = threshold.shape, threshold.dtype
        ctx.in_place, ctx.pinned = in_place, pinned
        return eff.detach()  # an alias sharing eff's version counter

    @staticmethod
    def backward(ctx, grad):
        (eff,) = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[:2]
        gw = gt = None
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, out of place
            sign = torch.sign(eff)
            gw = grad * sign.abs() if need_w else None
            gt = -(grad * sign).sum_to_size(ctx.threshold_shape) if need_t else None
        else:
            in_place = ctx.in_place and grad.is_contiguous() and grad.dtype == eff.dtype
            sign = None
            if need_t:
                sign = torch.sign(eff, out=workspace(eff.shape, eff.dtype, eff.device)) if in_place else torch.sign(eff)
                gt = _signed_sum(grad, sign, ctx.threshold_shape).neg_()
            if need_w:
                # grad where Ŵ != 0: softshrink's own backward, one kernel (|Ŵ| > 0 ⟺ |W| > t)
                if in_place:
                    gw = torch.ops.aten.softshrink_backward.grad_input(grad, eff, 0.0, grad_input=grad)
                else:
                    gw = torch.ops.aten.softshrink_backward(grad, eff, 0.0)
        if ctx.pinned is not None:
            ctx.pinned.release()
        return gw, None if gt is None else gt.to(ctx.threshold_dtype), None, None, None


def _fast(weight: torch.Tensor, threshold: torch.Tensor) -> bool:
    """Whether :class:`_SoftThreshold` applies (else the plain composition runs)."""
    return (weight.dtype in (torch.float32, torch.float64) and threshold.dtype == torch.float32
            and weight.layout == torch.strided and eager())


def soft_threshold(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """:func:`str_weight` in one pass, with the same values and gradients (custom autograd).

    ``weight`` float32 or float64; ``threshold`` a scalar or ``(Cout, 1, ...)`` tensor, ≥ 0.

    >>> soft_threshold(torch.tensor([0.5, -0.05, -0.3]), torch.tensor(0.1))
    tensor([ 0.4000, -0.0000, -0.2000])
    """
    if weight.dtype == torch.float64:
        threshold = threshold.to(weight.dtype)
    with torch.no_grad():
        eff = _shrink(weight, threshold)
    if not (torch.is_grad_enabled() and (weight.requires_grad or threshold.requires_grad)):
        return eff
    return _SoftThreshold.apply(weight, threshold, eff, False, None)


class STRMixin(SparseWeightMixin):
    """Conv/Linear computing with the STR weight; its ``s`` is its own parameter, or the group's
    shared one (global granularity: then ``_shared_s`` references it without registering)."""

    def init_sparse(self, granularity: str = "layer", s_init: float = -10.0, **_) -> None:
        w = self.weight
        if granularity == "global":
            # the group registers the shared parameter once and sets it here (not registered);
            # until then (shape propagation at build time) the layer computes with s_init
            object.__setattr__(self, "_shared_s", torch.tensor(float(s_init), device=w.device))
            return
        # per channel: one threshold per output feature, (Cout, 1, ...) or a Conv1D's (1, out)
        shape = (1,) if granularity == "layer" else self.out_shape(w.shape[self.out_axis])
        self.s = nn.Parameter(torch.full(shape, float(s_init), dtype=torch.float32, device=w.device))

    def threshold_param(self) -> nn.Parameter:
        s = self._parameters.get("s")
        if s is not None:
            return s
        # global: read from the group each time, as FSDP2 swaps its sharded and gathered parameters
        owner = self.__dict__.get("_s_owner")
        return owner._parameters["s"] if owner is not None else self.__dict__["_shared_s"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _reshape_scalar_s(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def threshold(self) -> torch.Tensor:
        """``sigmoid(s)`` in float32 (scalar or ``(Cout, 1, ...)``)."""
        return str_threshold(self.threshold_param())

    def effective_weight(self) -> torch.Tensor:
        w, t = self.weight, self.threshold()
        return soft_threshold(w, t) if _fast(w, t) else str_weight(w, t)

    def forward(self, x, output_size=None):
        check_gathered(self, self.weight)
        return self.forward_with(x, self._forward_weight(), output_size)

    def _forward_weight(self) -> torch.Tensor:
        """:meth:`effective_weight` for this layer's own conv/linear: written into a reused
        buffer (recomputed only when ``W`` or ``s`` changed) and backpropagated in place."""
        w, s = self.weight, self.threshold_param()
        t = str_threshold(s)
        if not _fast(w, t):
            return str_weight(w, t)
        bufs = layer_buffers(self)
        eff = bufs.cached("eff", w, s)
        if eff is None:
            buf = bufs.target("eff", w)  # None while a pending graph still needs the buffer
            with torch.no_grad():
                eff = _shrink(w, t) if buf is None else bufs.store("eff", _shrink(w, t, out=buf), w, s)
        if not (torch.is_grad_enabled() and (w.requires_grad or t.requires_grad)):
            return eff
        pinned = bufs.pin("eff", eff) if bufs.holds(eff) else None
        return _SoftThreshold.apply(w, t, eff, True, pinned)

    def sparse_repr(self) -> str:
        t = self.threshold().detach()
        return f"threshold={float(t.mean()):.4g}" + ("" if t.numel() == 1 else " (mean)")


STR_CLASSES = specialize(STRMixin, prefix="STR")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, gathered if FSDP2 shards it (a collective then: every rank calls it)."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


def _reshape_scalar_s(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """A 0-d ``s`` (checkpoints from before single thresholds were 1-element) loads as ``(1,)``."""
    v, own = state_dict.get(prefix + "s"), module._parameters.get("s")
    if isinstance(v, torch.Tensor) and own is not None and v.dim() == 0 and own.shape == (1,):
        state_dict[prefix + "s"] = v.reshape(1)

# Optimizers seen stepping an STR threshold without weight decay, reported by the groups' warnings().
_GROUPS: "weakref.WeakSet[STRGroup]" = weakref.WeakSet()
_HOOK = None


def _decay_of(group: dict) -> float:
    wd = group.get("weight_decay", 0.0)
    return float(wd) if isinstance(wd, (int, float)) else 0.0


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: note STR thresholds stepped with weight_decay == 0."""
    if not _GROUPS:
        return
    undecayed = {id(p) for g in optimizer.param_groups if _decay_of(g) == 0.0 for p in g["params"]}
    seen = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for group in list(_GROUPS):
        if any(id(p) in seen for _, p in group.thresholds()):
            group.stepped_by_torch_optimizer = True
    if not undecayed:
        return
    for group in list(_GROUPS):
        for name, p in group.thresholds():
            if id(p) in undecayed:
                group.undecayed.add(f"{type(optimizer).__name__} (weight_decay=0)")
                break


def _install_hook() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


class STRGroup(Group):
    """The layers of one STR rule: the shared threshold (global), decay options and the warning."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        if params["granularity"] == "global":
            device = next(iter(members.values())).weight.device
            self.s = nn.Parameter(torch.full((1,), float(params["s_init"]), dtype=torch.float32, device=device))
            for m in members.values():
                object.__setattr__(m, "_s_owner", self)
        self.undecayed: set[str] = set()
        self.stepped_by_torch_optimizer = False  # then the hook's verdict is exact
        self._last: dict[str, torch.Tensor] | None = None  # s after the previous step, to spot no decay
        self._frozen_names: list[str] = []
        _GROUPS.add(self)
        _install_hook()

    def thresholds(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, s)`` of every threshold parameter of this rule (once for global)."""
        if self.params["granularity"] == "global":
            return [("<global>", self.s)]
        return [(n, m.s) for n, m in self.members.items()]

    # -- optimizer plumbing ------------------------------------------------------------------
    def param_options(self, weight_decay: float) -> list[tuple[list[nn.Parameter], dict]]:
        """The thresholds get ``threshold_decay`` (default: the model's ``weight_decay``)."""
        decay = self.params["threshold_decay"]
        decay = weight_decay if decay is None else float(decay)
        return [([p for _, p in self.thresholds()], {"weight_decay": decay})]

    def reads_weights(self, step: int) -> bool:
        return False  # only the thresholds, gathered below when FSDP2 shards them

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _reshape_scalar_s(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        # a threshold whose loss gradient is exactly zero (sigmoid(s) underflows, as with the
        # paper's s_init = -3200) moves only by weight decay: if it did not move, nothing decays it
        now = {n: _whole(p).clone() for n, p in self.thresholds()}
        frozen = []
        if self._last is not None and not self.stepped_by_torch_optimizer:
            for n, p in self.thresholds():
                grad_zero = p.grad is None or not bool(_whole(p.grad).any())
                if grad_zero and bool((now[n] != 0).any()) and torch.equal(now[n], self._last[n]):
                    frozen.append(n)
        self._frozen_names = frozen
        self._last = now

    def warnings(self) -> list[str]:
        out = []
        if self.undecayed or self._frozen_names:
            where = (", ".join(sorted(self.undecayed)) if self.undecayed else
                     f"thresholds {', '.join(self._frozen_names[:3])}{' ...' if len(self._frozen_names) > 3 else ''} "
                     "did not move")
            out.append(f"STR: the optimizer applies no weight decay to the thresholds s ({where}); STR gets "
                       "its sparsity from that decay, so this run will stay dense. Build the optimizer with "
                       "sparsify.param_groups(model, weight_decay=...) or give every '.s' parameter "
                       "weight_decay > 0.")
        return out

    # -- reporting -------------------------------------------------------------------------
    def target(self, step: int):
        return None  # learned sparsity: no schedule

    def final_target(self):
        return None

    def describe(self, step: int) -> dict:
        ts = [float(str_threshold(p.detach()).mean()) for _, p in self.thresholds()]
        out = {"granularity": self.params["granularity"], "s_init": self.params["s_init"]}
        if ts:
            out["threshold_mean"] = sum(ts) / len(ts)
        return out

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        t = module.threshold().detach()
        return {"threshold": float(t.mean()), "s": float(module.threshold_param().detach().float().mean())}


@dataclass
class STRParams(Params):
    s_init: float = param(-10.0, "Initial threshold parameter s (threshold sigmoid(s)); negative starts near-dense.",
                          what="a number (e.g. -3200 as in the paper)")
    granularity: Literal["layer", "channel", "global"] = param(
        "layer", "One threshold per layer, per output channel, or one for the whole rule.")
    threshold_decay: float | None = param(None, "Weight decay of the threshold parameters (null: the optimizer's).",
                                          ge=0, what="null (= the optimizer's weight_decay) or >= 0")

    def check(self):
        s = self.s_init
        if s > 0:
            return [("s_init", f"{s} prunes every weight with |w| < sigmoid({s}) = "
                     f"{float(torch.sigmoid(torch.tensor(float(s)))):.3g} at step 0 (the official "
                     "repo's default 100 prunes everything); use a negative value such as -10, or the "
                     "paper's -3200 for long ImageNet runs")]
        return []


@register
class STRMethod(Method):
    """Recipe method ``str`` (docs/methods/str.md); params (:class:`STRParams`):

    * ``s_init`` (-10): initial threshold parameter s, threshold sigmoid(s); must be <= 0;
    * ``granularity`` ("layer"): ``"layer"``, ``"channel"`` or ``"global"`` thresholds;
    * ``threshold_decay`` (null): weight decay of the thresholds (null: the optimizer's).
    """

    name = "str"
    description = "STR: learned per-layer soft thresholds sigmoid(s), sparsity driven by weight decay (ICML 2020)"
    Params = STRParams
    group_class = STRGroup

    def out_channel_state(self, params: dict) -> bool:
        return params["granularity"] == "channel"

    def apply(self, site, params) -> None:
        site.replace(STR_CLASSES[weight_base(site.module)].from_dense(
            site.module, granularity=params["granularity"], s_init=params["s_init"]))
