"""The SAS layer's forward and backward: slots written into a shared workspace, one conv/matmul,
slots recomputed from ``x`` in the backward (only ``x`` is saved)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify.core.buffers import release_workspaces, workspace
from sparsify.core.devices import autocast_dtype, no_autocast

def _workspace(shape, like: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Room of ``shape`` for slots and slot gradients that never leave the layer: the thread's
    workspace (:func:`sparsify.core.buffers.workspace`), shared by every SAS layer (each use ends
    before the next layer's starts; the backward recomputes the slots into it). On CPU a fresh
    multi-MB tensor costs a page fault per 4 kB on its first write, more than the elementwise pass
    itself (docs/performance.md)."""
    return workspace(shape, like.dtype, like.device, index)


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
        cast = autocast_dtype(x)
        with no_autocast(x.device.type):
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
        if torch.is_grad_enabled():  # create_graph=True: torch would fail inside, on an out= write
            raise RuntimeError(
                "sparsify: SAS layers have no second derivative (a backward with create_graph=True: gradient "
                "penalties, MAML); take it through torch.func (grad of grad), where SAS runs plain ops, or leave "
                "these layers dense")
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
