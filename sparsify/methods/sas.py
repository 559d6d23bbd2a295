"""SAS: structured activation sparsification (ICLR 2024; repo DensoITLab/sas_). METHODS.md §3.

Each input element of a Conv/Linear is lifted into M slots of which at most one is non-zero and
the weight is M times wider along its input dimension, so the layer picks input-dependent weights
while its non-zero multiplies stay those of the narrow layer. With M = 2 (the official code) slot 0
holds relu(x), slot 1 relu(-x), and the weight ``(Cout, 2·Cin/groups, *k)`` is in the official
interleaved layout (column 2c is slot 0 of input channel c, 2c+1 slot 1), so an official
state_dict loads as is.

Three parts:

* :class:`SlotRule` (``sign`` for M = 2, ``signed_levels`` for any M; register your own with
  :func:`register_slot_rule`) says how an element is lifted;
* the modules ``SASConv1d/2d/3d`` and ``SASLinear``: the weight is the official interleaved
  parameter; the forward writes the slots into a scratch buffer shared by all SAS layers (no
  zeros tensor, no masks, no fresh allocation) and runs one conv/matmul (depthwise convs: one
  narrow conv per slot; strided 1x1 convs: only the positions they read); the backward
  recomputes the slots from ``x`` instead of saving them (:class:`_SASFunction`): only ``x`` is
  kept;
* the ReLU rewiring (:func:`find_relu_input` and :meth:`SASMethod.apply`): a selected layer fed by a
  relu reads the relu's input instead, and the relu stays only for its other users.
"""
from __future__ import annotations

import math
import threading
from statistics import NormalDist

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes import Change, reroute_input

from .base import TORCH_WEIGHT_TYPES, Group, GroupContext, Method, Site, SparseWeightMixin, specialize, weight_base

__all__ = ["SlotRule", "SignRule", "SignedLevelsRule", "SLOT_RULES", "register_slot_rule", "make_slot_rule",
           "SASMixin", "SAS_CLASSES", "SASMethod", "SASGroup", "find_relu_input", "release_workspaces"]


# --------------------------------------------------------------------------------------------
# slot rules
# --------------------------------------------------------------------------------------------

class SlotRule:
    """How one input element is lifted into ``m`` slots (at most one non-zero).

    Subclasses implement :meth:`slots` with plain, fx-traceable torch ops (it is also what the
    finalized model runs) and map 0 to all-zero slots (zero padding then commutes with the
    projection). ``relu_coefficients`` ``c`` satisfy ``Σ c_k·slot_k(x) = relu(x)`` and
    ``identity_coefficients`` ``Σ c_k·slot_k(x) = x``: they initialise a SAS layer from a dense one
    fed by a relu (rewired) or by anything (converted as is), and the backward rebuilds ``x`` from
    the kept slots with the latter. :meth:`project` and
    :meth:`project_backward` are the fast paths used in training; the defaults derive them from
    :meth:`slots`.
    """

    name = ""

    def __init__(self, m: int):
        self.m = int(m)

    def slots(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def relu_coefficients(self) -> list[float]:
        raise NotImplementedError

    def identity_coefficients(self) -> list[float]:
        raise NotImplementedError

    def project(self, x: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The slots stacked along a new dimension ``dim`` (no autograd), written into ``out``
        (shaped like the result) when given."""
        slots = torch.stack(self.slots(x), dim)
        return slots if out is None else out.copy_(slots)

    def project_backward(self, x: torch.Tensor | None, grads: list[torch.Tensor],
                         slots: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Gradient w.r.t. ``x`` given the gradient of each slot (by recomputing the slots); may
        overwrite ``grads``. ``x`` may be None when the ``slots`` are given (x is rebuilt from
        them with the identity coefficients: exact, at most one slot is non-zero)."""
        if x is None:
            x = sum(c * s for c, s in zip(self.identity_coefficients(), slots) if c)
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.slots(xd), xd, grads)[0]

    def options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{self.name}(m={self.m}{opts})"


class SignRule(SlotRule):
    """M = 2, the official rule: slot 0 = relu(x), slot 1 = relu(-x).

    >>> SignRule(2).slots(torch.tensor([-1.5, 2.0]))
    [tensor([0., 2.]), tensor([1.5000, 0.0000])]
    """

    name = "sign"

    def __init__(self, m: int = 2):
        if int(m) != 2:
            raise ValueError(f"slot rule 'sign' has exactly 2 slots, got m={m}; use 'signed_levels' for m > 2")
        super().__init__(2)

    def slots(self, x):
        return [torch.relu(x), torch.relu(torch.neg(x))]

    def relu_coefficients(self):
        return [1.0, 0.0]

    def identity_coefficients(self):
        return [1.0, -1.0]

    def project(self, x, dim, out=None):
        if out is None:
            shape = list(x.shape)
            shape.insert(dim % (x.dim() + 1), 2)
            out = x.new_empty(shape)
        pos, neg = out.unbind(dim)
        torch.clamp_min(x, 0, out=pos)
        # relu(-x) = relu(x) - x exactly (one of the two terms is 0): one pass instead of clamp + neg
        torch.sub(pos, x, out=neg)
        return out

    def project_backward(self, x, grads, slots=None):
        gpos, gneg = grads
        # relu'(0) = 0 for both slots, as autograd (and the official |x|·mask code) gives. Two
        # vectorized masking kernels and a subtraction: torch.where is ~50x slower on this CPU and
        # float masks would cost a pass each
        if x is None:  # x > 0 <=> slot 0 > 0, x < 0 <=> slot 1 > 0
            gx = torch.ops.aten.threshold_backward(gpos, slots[0], 0)
            torch.ops.aten.threshold_backward.grad_input(gneg, slots[1], 0, grad_input=gneg)
        else:
            gx = torch.ops.aten.threshold_backward(gpos, x, 0)
            torch.ops.aten.hardtanh_backward.grad_input(gneg, x, -math.inf, 0.0, grad_input=gneg)
        return gx.sub_(gneg)


class SignedLevelsRule(SlotRule):
    """This project's rule for any M (the official code has M = 2 only).

    The sign splits the slots: ``P = ceil(M/2)`` slots for x > 0, ``N = floor(M/2)`` for x <= 0.
    On each side |x| is cut into levels at the quantiles of a half-normal distribution (``scale``
    times), so that each slot gets the same share of a unit-normal input (e.g. a BatchNorm output
    at initialisation); the element's value |x| goes to the slot of its level: slot ``j`` for the
    j-th positive level, ``P + j`` for the j-th non-positive one. M = 2 is exactly :class:`SignRule`.

    >>> r = SignedLevelsRule(4)
    >>> [round(t, 3) for t in r.pos_levels], [round(t, 3) for t in r.neg_levels]
    ([0.674], [0.674])
    >>> torch.stack(r.slots(torch.tensor([-1.0, -0.5, 0.5, 1.0])))
    tensor([[0.0000, 0.0000, 0.5000, 0.0000],
            [0.0000, 0.0000, 0.0000, 1.0000],
            [0.0000, 0.5000, 0.0000, 0.0000],
            [1.0000, 0.0000, 0.0000, 0.0000]])
    """

    name = "signed_levels"

    def __init__(self, m: int, scale: float = 1.0):
        super().__init__(m)
        if self.m < 2:
            raise ValueError(f"signed_levels needs m >= 2, got {m}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"signed_levels: scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.n_pos, self.n_neg = (self.m + 1) // 2, self.m // 2
        half = NormalDist()
        self.pos_levels = [self.scale * half.inv_cdf(0.5 + 0.5 * j / self.n_pos) for j in range(1, self.n_pos)]
        self.neg_levels = [self.scale * half.inv_cdf(0.5 + 0.5 * j / self.n_neg) for j in range(1, self.n_neg)]

    @staticmethod
    def _bands(a, levels):
        edges = [None] + list(levels) + [None]
        out = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = None
            if lo is not None:
                m = a > lo
            if hi is not None:
                m = (a <= hi) if m is None else m & (a <= hi)
            out.append(m)
        return out

    def slots(self, x):
        a = torch.abs(x)
        pos = x > 0
        out = []
        for side, levels in ((pos, self.pos_levels), (torch.logical_not(pos), self.neg_levels)):
            for band in self._bands(a, levels):
                out.append(a * (side if band is None else side & band))
        return out

    def relu_coefficients(self):
        return [1.0] * self.n_pos + [0.0] * self.n_neg

    def identity_coefficients(self):
        return [1.0] * self.n_pos + [-1.0] * self.n_neg

    def options(self):
        return {"scale": self.scale}


SLOT_RULES: dict[str, type[SlotRule]] = {"sign": SignRule, "signed_levels": SignedLevelsRule}


def register_slot_rule(cls: type[SlotRule]) -> type[SlotRule]:
    """Make a :class:`SlotRule` subclass available to recipes as ``"slot_rule": cls.name``.

    >>> @register_slot_rule
    ... class Halves(SignRule):
    ...     name = "halves_example"
    >>> make_slot_rule("halves_example", 2).name
    'halves_example'
    """
    if not cls.name:
        raise ValueError("a slot rule needs a name")
    SLOT_RULES[cls.name] = cls
    return cls


def make_slot_rule(name: str, m: int, options: dict | None = None) -> SlotRule:
    """The slot rule ``name`` for ``m`` slots; ``"auto"`` is ``sign`` for m = 2 and
    ``signed_levels`` otherwise.

    >>> make_slot_rule("auto", 4)
    signed_levels(m=4, scale=1.0)
    """
    if name == "auto":
        name = "sign" if m == 2 else "signed_levels"
    if name not in SLOT_RULES:
        raise ValueError(f"unknown slot rule {name!r}; known: {', '.join(sorted(SLOT_RULES))} "
                         "(or 'auto'; register more with sparsify.methods.sas.register_slot_rule)")
    return SLOT_RULES[name](m, **(options or {}))


# --------------------------------------------------------------------------------------------
# the autograd function: slots in a reused workspace, one conv/matmul, only x kept
# --------------------------------------------------------------------------------------------

_WORKSPACES = threading.local()


def _workspace(shape, like: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Scratch space of ``shape`` for slots and slot gradients that never leave the layer.

    On CPU one buffer per thread, dtype and ``index``, grown as needed and shared by every SAS
    layer (each use ends before the next layer's starts; the backward recomputes the slots into
    it): a fresh multi-MB tensor costs a page fault per 4 kB on its first write on this project's
    CPU, more than the elementwise pass itself (docs/performance.md). Other devices get a fresh
    tensor (their caching allocators make that cheap). Free with :func:`release_workspaces`.
    """
    if like.device.type != "cpu":
        return like.new_empty(shape)
    bufs = getattr(_WORKSPACES, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACES.bufs = {}
    numel = math.prod(shape)
    key = (index, like.dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)


def release_workspaces() -> None:
    """Free the calling thread's SAS scratch buffers (M x the largest SAS layer input it has seen).

    >>> release_workspaces()
    """
    _WORKSPACES.bufs = {}


def _autocast_dtype(x: torch.Tensor):
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _per_slot(linear: bool, groups: int, x_shape) -> bool:
    """Depthwise convs run one narrow conv per slot (a depthwise kernel, 2-4x faster on CPU than one
    grouped conv with m inputs per group); other convs one conv over the interleaved slots (the
    official layout, so the weight and its gradient need no reshuffling)."""
    return not linear and groups > 1 and groups == x_shape[1]


def _per_slot_backward(x: torch.Tensor, grad: torch.Tensor, m: int) -> bool:
    """Whether a conv that ran one wide conv forward runs its backward as one narrow conv per slot
    (recomputing the slots in the per-slot layout). Measured on the CPU (oneDNN): the wide weight
    gradient is up to 3x slower than two narrow ones when the output has fewer positions
    (batch x spatial) than the wide input has channels (ResNet-18 layer4: 512 positions, 1024
    channels), and no faster otherwise; other devices keep the one wide conv."""
    return x.device.type == "cpu" and grad.numel() // grad.shape[1] <= m * x.shape[1]


def _pointwise_subsample(conf, kernel) -> tuple | None:
    """For a 1x1 conv without padding and with stride > 1 (ResNet downsample shortcuts): the index
    that picks the input positions it reads. Projecting only those (1/stride² of the input) and
    running the conv with stride 1 gives the same outputs; the official code projects everything."""
    linear, stride, padding, _, _ = conf
    if linear or any(k != 1 for k in kernel) or any(padding) or all(s == 1 for s in stride):
        return None
    return (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)


def _slot_dim(linear: bool, per_slot: bool, ndim: int) -> int:
    """Where the slot axis goes: last for Linear (interleaved features), after the channels for
    convs (the official interleaved layout), first for per-slot depthwise convs."""
    return ndim if linear else 0 if per_slot else 2


def _conv_slots(slots, weight, bias, conf):
    """Σ_k conv(slot_k, W[:, k::m]) (+ b): one narrow conv per slot."""
    _, stride, padding, dilation, groups = conf
    m = slots.shape[0]
    out = None
    for k in range(m):
        y = torch.convolution(slots[k], weight[:, k::m], bias if k == 0 else None,
                              stride, padding, dilation, False, [0] * len(stride), groups)
        out = y if out is None else out.add_(y)
    return out


class _SASFunction(torch.autograd.Function):
    """SAS layer forward/backward without the official zeros tensor and masks: the slots are
    written into a reused workspace (:func:`_workspace`) and one conv/matmul runs over them (the
    official interleaved layout; depthwise convs: one narrow conv per slot; strided 1x1 convs:
    only the positions they read). For the backward it keeps only ``x`` (``recompute``), projecting
    again into the workspace there, or a fresh copy of the slots."""

    @staticmethod
    def forward(ctx, x, weight, bias, rule, conf, recompute):
        cast = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w = weight if cast is None else weight.to(cast)
            b = bias if cast is None or bias is None else bias.to(cast)
            xc = x if cast is None else x.to(cast)
            xe, conf_e = _SASFunction._effective(xc, conf, weight.shape)
            gathered = xe is not xc
            if gathered:  # strided 1x1: read the positions once; the passes below run contiguous
                xe = xe.contiguous()
            linear, stride, padding, dilation, groups = conf_e
            per_slot = _per_slot(linear, groups, xe.shape)
            slots = _SASFunction._project(rule, xe, linear, per_slot, fresh=not recompute)
            if linear:
                out = F.linear(slots.flatten(-2), w, b)
            elif per_slot:
                out = _conv_slots(slots, w, b, conf_e)
            else:
                out = torch.convolution(slots.flatten(1, 2), w, b, stride, padding, dilation, False,
                                        [0] * len(stride), groups)
        # a strided 1x1 conv keeps its gathered input (1/stride² of x) instead of x
        kept = (xe if gathered else x) if recompute else None
        ctx.save_for_backward(kept, weight, bias, None if recompute else slots)
        ctx.x_shape, ctx.x_dtype, ctx.gathered = x.shape, x.dtype, gathered
        ctx.rule, ctx.conf, ctx.conf_e, ctx.per_slot, ctx.cast = rule, conf, conf_e, per_slot, cast
        return out

    @staticmethod
    def _effective(x, conf, wshape):
        """The input positions the layer reads and the conv settings for them."""
        index = _pointwise_subsample(conf, wshape[2:])
        if index is None:
            return x, conf
        linear, stride, padding, dilation, groups = conf
        return x[index], (linear, [1] * len(stride), padding, dilation, groups)

    @staticmethod
    def _project(rule, xe, linear: bool, per_slot: bool, fresh: bool):
        dim = _slot_dim(linear, per_slot, xe.dim())
        shape = list(xe.shape)
        shape.insert(dim, rule.m)
        return rule.project(xe, dim, xe.new_empty(shape) if fresh else _workspace(shape, xe))

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, slots = ctx.saved_tensors
        rule, cast, per_slot = ctx.rule, ctx.cast, ctx.per_slot
        if x is not None and not per_slot and not ctx.conf_e[0]:
            per_slot = _per_slot_backward(x, grad, rule.m)
        linear, stride, padding, dilation, groups = ctx.conf_e
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        w = weight if cast is None else weight.to(cast)
        m = rule.m
        xe = None
        if x is not None:
            xe = x if ctx.gathered or cast is None else x.to(cast)
            slots = _SASFunction._project(rule, xe, linear, per_slot, fresh=False)
        dim = _slot_dim(linear, per_slot, slots.dim() - 1)
        grad = grad.to(slots.dtype)
        gx = gw = gb = gslots = None
        if linear:
            g2 = grad.reshape(-1, grad.shape[-1])
            s2 = slots.reshape(g2.shape[0], -1)
            gw = g2.t() @ s2 if need_w else None
            gb = g2.sum(0) if need_b else None
            if need_x:
                gslots = torch.mm(g2, w, out=_workspace(s2.shape, s2, 1)).view(slots.shape).unbind(dim)
        elif not per_slot:
            gi, gw, gb = torch.ops.aten.convolution_backward(
                grad, slots.flatten(1, 2), w, [w.shape[0]] if bias is not None else None, stride, padding,
                dilation, False, [0] * len(stride), groups, [need_x, need_w, need_b])
            gslots = gi.view(slots.shape).unbind(dim) if need_x else None
        else:
            gslots, gws = [], []
            for k in range(m):
                gi, gwk, gbk = torch.ops.aten.convolution_backward(
                    grad, slots[k], w[:, k::m], [w.shape[0]] if bias is not None else None,
                    stride, padding, dilation, False, [0] * len(stride), groups, [need_x, need_w, need_b and k == 0])
                gslots.append(gi)
                gws.append(gwk)
                if k == 0:
                    gb = gbk
            if need_w:
                gw = torch.stack(gws, 2).flatten(1, 2)
        if need_x:
            gx = rule.project_backward(xe, list(gslots), None if xe is not None else list(slots.unbind(dim)))
            if gx.shape != ctx.x_shape:  # strided 1x1 conv: the positions it does not read get 0
                full = gx.new_zeros(ctx.x_shape)
                full[_pointwise_subsample(ctx.conf, weight.shape[2:])] = gx
                gx = full
            gx = gx.to(ctx.x_dtype)
        if gw is not None:
            gw = gw.to(weight.dtype)
        if gb is not None:
            gb = gb.to(bias.dtype)
        return gx, gw, gb, None, None, None


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

class SASMixin(SparseWeightMixin):
    """A Conv1d/2d/3d or Linear whose input is lifted into ``sas_m`` slots (see the module doc).

    Build one directly like the torch layer plus ``m``/``slot_rule`` (weights initialised like the
    official ``SASConv2d``), or from a dense layer with :meth:`from_dense`. ``weight`` has the
    official interleaved layout ``(Cout, m·Cin/groups, *k)`` / ``(out, m·in)``; ``in_channels`` /
    ``in_features`` keep the narrow input size.

    >>> layer = SASConv2d(8, 16, 3, padding=1)
    >>> tuple(layer.weight.shape), tuple(layer(torch.randn(2, 8, 5, 5)).shape)
    ((16, 16, 3, 3), (2, 16, 5, 5))
    """

    def __init__(self, *args, m: int = 2, slot_rule: str = "auto", slot_options: dict | None = None,
                 recompute: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_sparse(m=m, slot_rule=slot_rule, slot_options=slot_options, recompute=recompute)
        self.reset_sas_parameters()

    def init_sparse(self, m: int = 2, slot_rule: str = "auto", slot_options: dict | None = None,
                    coefficients: list[float] | None = None, sas_input: str = "as constructed",
                    recompute: bool = True) -> None:
        """Widen ``weight`` to ``m`` slots: slot k holds ``coefficients[k] · W`` (default all zero
        but slot 0, i.e. the dense layer on relu inputs)."""
        rule = make_slot_rule(slot_rule, int(m), slot_options)
        self.sas_m = rule.m
        self.slot_rule = rule
        self.sas_input = sas_input
        self.sas_recompute = bool(recompute)  # keep only x for the backward (memory) or the slots (speed)
        dense = self.weight.detach()
        coefficients = coefficients if coefficients is not None else [1.0] + [0.0] * (rule.m - 1)
        wide = torch.stack([c * dense for c in coefficients], 2).flatten(1, 2)
        self.weight = nn.Parameter(wide.contiguous(), requires_grad=self.weight.requires_grad)

    @torch.no_grad()
    def reset_sas_parameters(self) -> None:
        """The official initialisation: Kaiming-uniform over the wide weight, bias bound from the
        narrow fan-in."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = nn.init._calculate_fan_in_and_fan_out(self.weight)[0] / self.sas_m
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def dense_class(self) -> type:
        return weight_base(self)

    def forward(self, x):
        linear = isinstance(self, nn.Linear)
        if linear:
            conf = (True, None, None, None, 1)
        else:
            padding = self.padding
            if isinstance(padding, str) or self.padding_mode != "zeros":
                # slot rules map 0 to 0 and copy-padding commutes with the elementwise projection
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
                padding = (0,) * len(self.kernel_size)
            conf = (False, list(self.stride), list(padding), list(self.dilation), self.groups)
        return _SASFunction.apply(x, self.weight, self.bias, self.slot_rule, conf, self.sas_recompute)

    def reference_forward(self, x):
        """The same result through plain autograd ops (slots stacked, interleaved, one wide layer)."""
        linear = isinstance(self, nn.Linear)
        dim = -1 if linear else 2
        proj = torch.stack(self.slot_rule.slots(x), dim).flatten(dim - 1, dim)
        return F.linear(proj, self.weight, self.bias) if linear else self._conv_forward(proj, self.weight, self.bias)

    def deploy_module(self) -> fx.GraphModule:
        """A plain-ops copy (slot ops, stack, conv/linear) as a ``GraphModule`` holding
        ``weight`` (official layout) and ``bias``; ``torch.export`` accepts it."""
        return fx.symbolic_trace(SASDeploy(self))

    def sparse_repr(self) -> str:
        return f"m={self.sas_m}, slot_rule={self.slot_rule!r}" + ("" if self.sas_recompute else ", keep slots")


SAS_CLASSES = specialize(SASMixin, prefix="SAS")
SASConv1d, SASConv2d, SASConv3d, SASLinear = (SAS_CLASSES[t] for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


class SASDeploy(nn.Module):
    """What :meth:`SASMixin.deploy_module` traces: the official forward without the zeros tensor."""

    def __init__(self, layer: SASMixin):
        super().__init__()
        self.linear = isinstance(layer, nn.Linear)
        self.rule = layer.slot_rule
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        if not self.linear:
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(layer.kernel_size)]
            self.pad = None
            self.padding = layer.padding
            if layer.padding_mode != "zeros":
                self.pad = (layer._reversed_padding_repeated_twice, layer.padding_mode)
                self.padding = 0
            self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups

    def forward(self, x):
        if self.linear:
            proj = torch.stack(self.rule.slots(x), -1).flatten(-2)
            return F.linear(proj, self.weight, self.bias)
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        proj = torch.stack(self.rule.slots(x), 2).flatten(1, 2)
        return self.conv(proj, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# --------------------------------------------------------------------------------------------
# the ReLU rewiring
# --------------------------------------------------------------------------------------------

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
# ops g with relu(g(x)) == g(relu(x)): the relu can be moved past them without changing anything
_EXACT_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                  nn.Dropout2d, nn.Dropout3d)
_EXACT_OPS = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
              "adaptive_max_pool3d", "flatten", "reshape", "view", "contiguous", "squeeze", "unsqueeze",
              "dropout", "dropout1d", "dropout2d", "dropout3d"}
# averaging ops: looking through them (the official ResNet head) changes the function
_AVERAGE_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d)
_AVERAGE_OPS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "mean"}


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _fn_name(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").strip("_")
    if node.op == "call_method":
        return str(node.target)
    return None


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``nn.ReLU`` calls, ``F.relu`` / ``torch.relu`` (in place or not) and ``x.relu()``."""
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _relu_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(_module(gm, node).inplace)
    if node.op == "call_method":
        return node.target == "relu_"
    if node.target in (torch.relu_, F.relu_):
        return True
    return bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))


def _pass_through(gm: fx.GraphModule, node: fx.Node, through_average: bool) -> str | None:
    """``"exact"`` / ``"average"`` when a relu may be looked through ``node``, else None."""
    if node.op == "call_module":
        mod = _module(gm, node)
        if isinstance(mod, _EXACT_MODULES):
            if getattr(mod, "return_indices", False) or getattr(mod, "inplace", False):
                return None
            return "exact"
        return "average" if through_average and isinstance(mod, _AVERAGE_MODULES) else None
    name = _fn_name(node)
    if name is None or str(node.target).endswith("_") or node.kwargs.get("return_indices") or \
            node.kwargs.get("inplace"):
        return None
    if name in _EXACT_OPS:
        return "exact"
    return "average" if through_average and name in _AVERAGE_OPS else None


def find_relu_input(gm: fx.GraphModule, node: fx.Node, through_average: bool = False):
    """For the layer call ``node``: ``(relu node, ops between it and the layer, exact)`` when its
    input is a relu output, looking through ops that commute with relu (max pooling, flatten,
    reshapes, dropout) and, with ``through_average``, through average pooling; else None.
    ``exact`` is False when an average pool was crossed.

    >>> seq = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 1, 1))
    >>> gm = fx.symbolic_trace(seq)
    >>> relu, chain, exact = find_relu_input(gm, list(gm.graph.nodes)[3])
    >>> relu.target, [n.target for n in chain], exact
    ('0', ['1'], True)
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    cur, chain, exact = node.args[0], [], True
    for _ in range(16):
        if is_relu(gm, cur):
            if not cur.args or not isinstance(cur.args[0], fx.Node):
                return None
            return cur, chain[::-1], exact
        kind = _pass_through(gm, cur, through_average)
        if kind is None or not cur.args or not isinstance(cur.args[0], fx.Node):
            return None
        exact = exact and kind == "exact"
        chain.append(cur)
        cur = cur.args[0]
    return None


def _non_negative(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the layer's input is known to be >= 0 (a relu output, through exact ops)."""
    found = find_relu_input(gm, node)
    return found is not None


def _make_relu_out_of_place(gm: fx.GraphModule, relu: fx.Node, changes: list[Change]) -> fx.Node:
    """Replace an in-place relu by ``torch.relu``. Users of its input placed after it saw the
    mutated (relu'd) tensor: they now read the relu's output, which is the same value."""
    if not _relu_inplace(gm, relu):
        return relu
    graph = gm.graph
    x = relu.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(x.users):
        if user is not relu and order[user] > order[relu]:
            changes.append(reroute_input(user, x, relu))
    with graph.inserting_after(relu):
        new = graph.call_function(torch.relu, (x,))
    new.meta.update(relu.meta)
    relu.replace_all_uses_with(new)
    graph.erase_node(relu)
    changes.append(Change("replace", relu.name, f"in-place relu -> torch.relu ({new.name}) so that its input "
                                                "stays the pre-activation"))
    return new


def _rewire(gm: fx.GraphModule, node: fx.Node, relu: fx.Node, chain: list[fx.Node], exact: bool,
            changes: list[Change]) -> str:
    """Feed ``node`` (the SAS layer) the relu's input, passed through a copy of ``chain``."""
    graph = gm.graph
    relu = _make_relu_out_of_place(gm, relu, changes)
    relu_name = str(relu.target) if relu.op == "call_module" else relu.name
    pre = relu.args[0]
    if not chain:
        changes.append(reroute_input(node, relu, pre))
    else:
        prev, prev_new = relu, pre
        for op in chain:
            with graph.inserting_before(op):
                new = graph.node_copy(op, lambda n, p=prev, q=prev_new: q if n is p else n)
            changes.append(Change("insert", new.name, f"copy of {op.name} on the pre-activation {pre.name}"))
            prev, prev_new = op, new
        changes.append(reroute_input(node, chain[-1], prev_new))
        end = chain[-1]
        if exact and end.users:
            # relu commutes with the chain: its other users get relu(chain(x)), the same values
            with graph.inserting_after(prev_new):
                r = graph.call_function(torch.relu, (prev_new,))
            r.meta.update(end.meta)
            end.replace_all_uses_with(r)
            changes.append(Change("insert", r.name, f"relu moved past {', '.join(n.name for n in chain)}"))
        for op in reversed(chain):
            if not op.users:
                graph.erase_node(op)
                changes.append(Change("erase", op.name))
    if not relu.users:
        graph.erase_node(relu)
        changes.append(Change("erase", relu.name, "relu without users after the SAS rewiring"))
    return f"rewired from relu {relu_name}" + (f" through {', '.join(n.name for n in chain)}" if chain else "")


# --------------------------------------------------------------------------------------------
# method and group
# --------------------------------------------------------------------------------------------

class SASGroup(Group):
    """The SAS layers of one rule: no per-step state; reporting and deployment."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        object.__setattr__(self, "_root", ctx.root)  # for the MAC factors; not a submodule

    def describe(self, step: int) -> dict:
        m = self.params["m"]
        rule = make_slot_rule(self.params["slot_rule"], m, self.params["slot_options"])
        return {"m": m, "slot_rule": repr(rule), "activation_sparsity": 1 - 1 / m}

    @torch.no_grad()
    def layer_stats(self, name: str, module: nn.Module) -> dict:
        w = module.weight
        m = module.sas_m
        nnz = int(torch.count_nonzero(w))
        out = {"params": w.numel(), "nonzero_params": nnz, "weight_sparsity": 1 - nnz / w.numel(),
               "m": m, "input": module.sas_input, "activation_sparsity": 1 - 1 / m}
        state = getattr(self._root, "sparsify_state", None)
        factor = state.layer_factors.get(name) if state is not None else None
        if factor is not None:
            narrow = int(round(factor * w.numel() / m))
            # the authors count one multiply per input element (its one active slot): the dense MACs
            out.update(macs=narrow, nonzero_macs=narrow, executed_macs=int(round(factor * w.numel())))
        return out

    def finalize_member(self, name: str, module: nn.Module) -> nn.Module:
        return module.deploy_module()


_CHOICES = {"input": ("rewire", "as_is"), "not_relu": ("dense", "as_is"), "init": ("auto", "zero", "identity")}


class SASMethod(Method):
    """Recipe method ``sas``; parameters (see docs/methods/sas.md):

    * ``m`` (2): slots per input element; ``slot_rule`` (``"auto"``: ``sign`` for m = 2,
      ``signed_levels`` otherwise) and ``slot_options`` (e.g. ``{"scale": 1.0}``);
    * ``input``: ``"rewire"`` (a layer fed by a relu reads the relu's input) or ``"as_is"``;
    * ``not_relu``: for ``rewire`` layers not fed by a relu, ``"dense"`` (left alone) or ``"as_is"``;
    * ``through_average`` (false): also look through average pooling to find the relu (the
      official ResNet head; changes the function);
    * ``init``: ``"auto"`` (relu coefficients where the input is a relu output, identity
      coefficients otherwise, so the converted network computes what the dense one did),
      ``"zero"`` (the official converter: negative slots zero everywhere) or ``"identity"``;
    * ``recompute`` (true): keep only the input for the backward and recompute the slots there
      into the shared scratch buffer (M x less activation memory for the layer, two more
      elementwise passes; measured no slower); false keeps a copy of the slots.
    """

    name = "sas"
    description = "SAS: structured activation sparsification, M slots per input, relu rewiring (ICLR 2024)"
    params = {"m": 2, "slot_rule": "auto", "slot_options": {}, "input": "rewire", "not_relu": "dense",
              "through_average": False, "init": "auto", "recompute": True}
    group_class = SASGroup
    targets = TORCH_WEIGHT_TYPES  # not transformers' Conv1D: its slot layout is not implemented
    full_trace = True  # the relu feeding a layer may sit inside a module with nothing to rewrite

    def check(self, params):
        problems = []
        m = params.get("m")
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            problems.append(("m", f"must be an integer >= 2, got {m!r}"))
        elif not isinstance(params.get("slot_options"), dict):
            problems.append(("slot_options", "must be an object of slot rule options"))
        else:
            try:
                make_slot_rule(params.get("slot_rule"), m, params.get("slot_options"))
            except (ValueError, TypeError) as e:
                problems.append(("slot_rule", str(e)))
        for key, allowed in _CHOICES.items():
            if params.get(key) not in allowed:
                problems.append((key, f"must be one of {', '.join(map(repr, allowed))}, got {params.get(key)!r}"))
        for key in ("through_average", "recompute"):
            if not isinstance(params.get(key), bool):
                problems.append((key, "must be true or false"))
        return problems

    def accepts(self, site: Site) -> str | None:
        why = super().accepts(site)
        if why:
            return why
        p = {**self.params, **site.params}
        if p["input"] == "as_is" or p["not_relu"] == "as_is":
            return None
        if site.node is None:
            return "sas: input unknown (layer outside a traced graph); not_relu='as_is' converts it as is"
        if find_relu_input(site.gm, site.node, p["through_average"]) is None:
            src = site.node.args[0].name if site.node.args and isinstance(site.node.args[0], fx.Node) else "?"
            return f"sas: input {src} is not a relu output (not_relu='as_is' would convert it as is)"
        return None

    def apply(self, site: Site, params) -> None:
        p = {**self.params, **params}
        found = None
        if p["input"] == "rewire" and site.node is not None:
            found = find_relu_input(site.gm, site.node, p["through_average"])
        rule = make_slot_rule(p["slot_rule"], p["m"], p["slot_options"])
        relu_input = found is not None or (site.node is not None and _non_negative(site.gm, site.node))
        init = p["init"]
        if init == "auto":
            init = "zero" if relu_input else "identity"
        coefficients = rule.relu_coefficients() if init == "zero" else rule.identity_coefficients()
        if found is not None:
            how = _rewire(site.gm, site.node, *found, site.changes)
        else:
            how = "as is" + (" (input is a relu output)" if relu_input else "")
        new = SAS_CLASSES[weight_base(site.module)].from_dense(
            site.module, m=p["m"], slot_rule=p["slot_rule"], slot_options=p["slot_options"],
            coefficients=coefficients, sas_input=how, recompute=p["recompute"])
        site.replace(new)
