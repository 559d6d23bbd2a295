"""N:M weight sparsity: N non-zeros kept in every M consecutive input channels (2:4, 1:4, ...).

Groups run along the input dimension the way sparse tensor cores consume them (NVIDIA ASP):
for a conv weight ``(Cout, Cin/groups, kh, kw)``, each group is M consecutive input channels at
a fixed ``(out, kh, kw)``; for a Linear, M consecutive input features; for transformers'
``Conv1D`` (weight ``(in, out)``), M consecutive rows of its weight at a fixed column. The N
largest ``|W|`` of each group are kept (ties: the lower index).

Training is straight-through (Zhou et al., ICLR 2021): the forward computes with ``W ⊙ M``, the
backward passes the gradient to every latent weight (pruned ones included), and the mask is
recomputed from ``|W|`` after every optimizer step from ``begin`` on. ``decay`` > 0 adds SR-STE's
``decay · (1 − M) ⊙ W`` to the gradient of pruned weights. From ``fix`` on the mask is frozen
and pruned weights get zero gradient. Layers whose input channels are not a multiple of M
(depthwise convs, an RGB stem) stay dense; ``plan`` says why. ``report`` checks every layer:
``nm_compliant`` per layer and for the group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.core.contract import Group, GroupContext, Method
from sparsify.core.registry import register
from sparsify.core.params import Params, param
from sparsify.core.layers import SparseWeightMixin, specialize, weight_base
from sparsify.core.conv1d import torch_layout
from sparsify.core.buffers import content_key, eager, layer_buffers, workspace
from sparsify.core.sharded import check_gathered

__all__ = ["NMMethod", "NMMixin", "nm_mask", "nm_compliant"]


def _grouped(t: torch.Tensor, m: int) -> torch.Tensor:
    """``(…, M)`` view of a weight with input channels last (a copy for convs)."""
    return t.movedim(1, -1).reshape(-1, m)


def _keep_planes(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, int, int]:
    """The N:M keep flags of ``weight`` in planes layout: ``flat[:N]`` viewed ``(m, rows, k)``
    holds member ``j`` of every group (``rows`` groups of ``k`` kernel positions) in plane ``j``.

    ``flat`` is a thread-shared uint8 scratch tensor of ``N`` rounded up to 8 bytes, its tail
    zeroed (so it can be compared 8 bytes at a time). Member ``j`` is kept when fewer than ``n``
    members beat it: later members win only by a larger ``|W|``, so ties keep the lower channel.
    ``m(m−1)/2`` comparisons of contiguous planes, no sort.
    """
    w = weight.detach()
    cout, cin = w.shape[0], w.shape[1]
    if cin % m:
        raise ValueError(f"nm_mask: {cin} input channels are not a multiple of m={m}")
    k = w[0, 0].numel()  # kernel positions
    rows = cout * (cin // m)
    size = rows * k
    planes = workspace((m, rows, k), w.dtype, w.device)
    torch.abs(w.reshape(rows, m, k).transpose(0, 1), out=planes)
    planes = planes.view(m, size)
    # rank[j] = (members beating member j) − n, kept iff negative. The earlier members win
    # ties, so it starts at j − n, and each comparison with a later member i moves it (i beats
    # j iff |W_i| > |W_j|). int8 planes: the additions and the sign test are ~10x cheaper than
    # on floats or against a Python scalar.
    rank_dtype = torch.int8 if m <= 60 else torch.int32
    rank = workspace((m, size), rank_dtype, w.device)
    for j in range(m):
        rank[j].fill_(j - n)
    beats = workspace((size,), torch.bool, w.device)
    for j in range(m):
        for i in range(j + 1, m):
            torch.lt(planes[j], planes[i], out=beats)
            b = beats.view(torch.int8) if rank_dtype == torch.int8 else beats.to(rank_dtype)
            rank[j].add_(b)
            rank[i].sub_(b)
    total = m * size
    flat = workspace((-(-total // 8) * 8,), torch.uint8, w.device)
    flat[total:].zero_()
    torch.signbit(rank, out=flat[:total].view(torch.bool).view(m, size))
    return flat, rows, k


def _to_weight_layout(flat: torch.Tensor, out: torch.Tensor, m: int, rows: int, k: int) -> None:
    """Write planes-layout keep flags into a contiguous bool tensor in the weight's layout."""
    out.view(torch.uint8).view(rows, m, k).copy_(flat[:out.numel()].view(m, rows, k).transpose(0, 1))


def nm_mask(weight: torch.Tensor, n: int, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` largest ``|W|`` of every ``m`` consecutive input channels (ties: the
    lower channel), as a bool tensor shaped like ``weight`` (written into ``out`` if given).

    Exact and sort-free (``m(m−1)/2`` comparisons of contiguous planes of ``|W|``).

    >>> nm_mask(torch.tensor([[0.1, -0.9, 0.5, 0.2, 1.0, 0.0, 0.0, -2.0]]), 2, 4).int()
    tensor([[0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.int32)
    """
    with torch.no_grad():
        flat, rows, k = _keep_planes(weight, n, m)
        if out is None:
            out = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        target = out if out.is_contiguous() and out.dtype == torch.bool else torch.empty(
            weight.shape, dtype=torch.bool, device=weight.device)
        _to_weight_layout(flat, target, m, rows, k)
        if target is not out:
            out.copy_(target)
    return out


def _changed(flat: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Indices where two equally long uint8 tensors (length a multiple of 8) differ: compared
    8 bytes at a time, then byte by byte inside the words that differ (a few per step)."""
    words = torch.bitwise_xor(flat.view(torch.int64), prev.view(torch.int64),
                              out=workspace((flat.numel() // 8,), torch.int64, flat.device))
    at = words.nonzero().view(-1)
    if at.numel() == 0:
        return at
    row, col = (flat.view(-1, 8)[at] != prev.view(-1, 8)[at]).nonzero().unbind(1)
    return at[row] * 8 + col


def nm_compliant(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` input channels holds at most ``n`` non-zeros.

    >>> nm_compliant(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
    True
    """
    return bool((_grouped(weight != 0, m).sum(1) <= n).all())


class _MaskedStraightThrough(torch.autograd.Function):
    """Forward ``W ⊙ M``; backward: the gradient to every W, plus ``decay·(1−M)⊙W`` (SR-STE).

    The plain version (a bool mask, fresh tensors): what tracers and transforms run, and the
    reference :class:`_NMWeight` is tested against."""

    @staticmethod
    def forward(ctx, weight, mask, decay: float):
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        if ctx.decay:
            weight, mask = ctx.saved_tensors
            grad = grad + ctx.decay * weight * ~mask
        return grad, None, None


class _NMWeight(torch.autograd.Function):
    """Autograd for ``Ŵ = W ⊙ M`` given ``Ŵ`` (``eff``) and the float mask ``mask_f``.

    ``straight``: the straight-through gradient (plus SR-STE's ``decay·(1−M)⊙W``, computed as
    ``decay·(W − Ŵ)``: the same numbers); else the hard mask's ``grad ⊙ M``. ``in_place``: the
    incoming gradient belongs to this node alone (the layer's own conv made it) and is edited in
    place: no allocation. ``pinned``: the buffer's pin, released once the backward ran."""

    @staticmethod
    def forward(ctx, weight, eff, mask_f, straight: bool, decay: float, in_place: bool, pinned):
        ctx.straight, ctx.decay, ctx.in_place, ctx.pinned = straight, decay, in_place, pinned
        # what the backward reads, and eff always: a pinned buffer is released through it
        sr_ste = straight and bool(decay)
        ctx.save_for_backward(weight if sr_ste else None, eff, mask_f if sr_ste or not straight else None)
        return eff.detach()  # an alias sharing eff's version counter

    @staticmethod
    def backward(ctx, grad):
        weight, eff, mask_f = ctx.saved_tensors
        in_place = (ctx.in_place and not torch.is_grad_enabled() and grad.is_contiguous()
                    and grad.dtype == eff.dtype)
        if ctx.straight and ctx.decay:
            if in_place:
                pruned = torch.sub(weight, eff, out=workspace(eff.shape, eff.dtype, eff.device))
                gw = grad.add_(pruned.mul_(ctx.decay))
            else:
                gw = grad + ctx.decay * weight * (1 - mask_f)  # differentiable in weight, as the reference
        elif ctx.straight:
            gw = grad
        else:
            gw = grad.mul_(mask_f) if in_place else grad * mask_f
        if ctx.pinned is not None:
            ctx.pinned.release()
        return gw, None, None, None, None, None, None


class NMMixin(SparseWeightMixin):
    """Conv/Linear computing with ``W ⊙ M`` (N:M mask set by the group).

    The forward multiplies by a float copy of the mask (bool/float products are several times
    slower), refreshed when the mask changes, into a reused buffer recomputed only when ``W``
    or the mask changed (see :mod:`sparsify.core.buffers`)."""

    def init_sparse(self, n: int = 2, m: int = 4, decay: float = 0.0, **_) -> None:
        self.nm = (int(n), int(m))
        self.sr_ste_decay = float(decay)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=self.weight.device))

    def _is_fixed(self) -> bool:
        # bool(tensor) would synchronise a GPU in every forward: remember it per version
        key = content_key(self.fixed)
        seen = self.__dict__.get("_fixed_seen")
        if key is None or seen is None or seen[0] != key:
            seen = self.__dict__["_fixed_seen"] = (key, bool(self.fixed))
        return seen[1]

    def mask_float(self) -> torch.Tensor:
        """The mask as 0/1 in the weight's dtype (refreshed when the bool mask changed)."""
        w, mask = self.weight, self.mask
        bufs = layer_buffers(self)
        mask_f = bufs.cached("mask_f", mask)
        if mask_f is None:
            buf = bufs.target("mask_f", w)
            with torch.no_grad():
                # through uint8: bool -> float copies are ~2x slower than uint8 -> float
                src = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
                mask_f = src.to(w.dtype) if buf is None else bufs.store("mask_f", buf.copy_(src), mask)
        return mask_f

    def _fast(self) -> bool:
        w = self.weight
        return w.is_floating_point() and w.layout == torch.strided and self.mask.shape == w.shape and eager()

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        if not self._fast():
            if bool(self.fixed):  # a tracer records the branch taken (as before these fast paths)
                return w * self.mask
            return _MaskedStraightThrough.apply(w, self.mask, self.sr_ste_decay)
        mask_f = self.mask_float()
        with torch.no_grad():
            eff = w * mask_f
        if not (torch.is_grad_enabled() and w.requires_grad):
            return eff
        return _NMWeight.apply(w, eff, mask_f, not self._is_fixed(), self.sr_ste_decay, False, None)

    def forward(self, x, output_size=None):
        check_gathered(self, self.weight)
        return self.forward_with(x, self._forward_weight(), output_size)

    def _forward_weight(self) -> torch.Tensor:
        """:meth:`effective_weight` for this layer's own conv/linear: a reused buffer,
        backpropagated in place."""
        if not self._fast():
            return self.effective_weight()
        w = self.weight
        mask_f = self.mask_float()
        bufs = layer_buffers(self)
        eff = bufs.cached("eff", w, mask_f)
        if eff is None:
            buf = bufs.target("eff", w)  # None while a pending graph still needs the buffer
            with torch.no_grad():
                eff = w * mask_f if buf is None else bufs.store("eff", torch.mul(w, mask_f, out=buf), w, mask_f)
        if not (torch.is_grad_enabled() and w.requires_grad):
            return eff
        pinned = bufs.pin("eff", eff) if bufs.holds(eff) else None
        return _NMWeight.apply(w, eff, mask_f, not self._is_fixed(), self.sr_ste_decay, True, pinned)

    @torch.no_grad()
    def recompute_mask(self, n: int, m: int) -> None:
        """Set ``mask`` to :func:`nm_mask` of the current weight.

        Between steps only a few thousand of millions of flags flip, so the layer keeps its
        mask in planes layout as well and writes only the flags that changed (into ``mask`` and
        its float copy); a full rewrite happens the first time and whenever something else
        wrote the mask (``load_state_dict``, a user)."""
        w, mask = self.weight, self.mask
        # groups run along the input dimension: computed in torch's (out, in, ...) layout
        wt = torch_layout(self, w)
        flat, rows, k = _keep_planes(wt, n, m)
        state = layer_buffers(self).state
        prev = state.get("keep")
        key = content_key(mask)
        if (prev is None or key is None or state.get("mask_key") != key or prev.shape != flat.shape
                or prev.device != flat.device or not mask.is_contiguous() or mask.dtype != torch.bool):
            if not mask.is_contiguous() or mask.dtype != torch.bool:
                nm_mask(wt, n, m, out=torch_layout(self, mask))
            elif self.out_axis:  # a Conv1D's / ConvTranspose's mask is the transpose of the torch layout
                full = torch.empty(wt.shape, dtype=torch.bool, device=w.device)
                _to_weight_layout(flat, full, m, rows, k)
                mask.copy_(torch_layout(self, full))
            else:
                _to_weight_layout(flat, mask, m, rows, k)
            if prev is None or prev.shape != flat.shape or prev.device != flat.device:
                prev = state["keep"] = torch.empty_like(flat)
            prev.copy_(flat)
        else:
            at = _changed(flat, prev)
            if at.numel():
                vals = flat[at]
                prev[at] = vals
                size = rows * k
                member, rest = at // size, at % size
                at_w = (rest // k) * (m * k) + member * k + rest % k  # planes -> weight layout
                if self.out_axis:  # (out, in, k) index -> the Conv1D's / ConvTranspose's (in, out, k) one
                    cout, cin = wt.shape[0], wt.shape[1]
                    o, i = at_w // (cin * k), (at_w // k) % cin
                    at_w = (i * cout + o) * k + at_w % k
                bufs = layer_buffers(self)
                mask_f = bufs.cached("mask_f", mask)  # still the float copy of the old mask?
                mask.view(-1)[at_w] = vals.view(torch.bool)
                if mask_f is not None:
                    mask_f.view(-1)[at_w] = vals.to(mask_f.dtype)
                    bufs.store("mask_f", mask_f, mask)
        state["mask_key"] = content_key(mask)

    def sparse_repr(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}, fixed={bool(self.fixed)}"


NM_CLASSES = specialize(NMMixin, prefix="NM")


class NMGroup(Group):
    """The layers of one N:M rule: masks recomputed each step from ``begin`` until ``fix``."""

    def __init__(self, method, params, members, ctx: GroupContext):
        super().__init__(method, params, members, ctx)
        self.n, self.m = int(params["n"]), int(params["m"])
        self.begin = ctx.time(params["begin"], "begin")
        self.fix_at = ctx.time(params["fix"], "fix")
        if self.fix_at is not None and self.fix_at < self.begin:
            raise ValueError(f"nm: fix ({self.fix_at}) is before begin ({self.begin})")

    def target(self, step: int) -> float:
        return 1.0 - self.n / self.m if step >= self.begin else 0.0

    def final_target(self) -> float:
        return 1.0 - self.n / self.m

    def reads_weights(self, step: int) -> bool:
        return step >= self.begin and not all(bool(m.fixed) for m in self.members.values())

    @torch.no_grad()
    def update(self, step: int, loss=None) -> None:
        for m in self.members.values():
            if bool(m.fixed):
                continue
            if step < self.begin:
                m.mask.fill_(True)
                continue
            m.recompute_mask(self.n, self.m)
            if self.fix_at is not None and step >= self.fix_at:
                m.fixed.fill_(True)

    def _compliance(self) -> dict[str, bool]:
        return {n: nm_compliant(torch_layout(m, m.deployed_weight()), self.n, self.m) for n, m in self.members.items()}

    def describe(self, step: int) -> dict:
        phase = ("dense" if step < self.begin else
                 "fixed" if self.fix_at is not None and step >= self.fix_at else "straight-through")
        return {"phase": phase, "nm": f"{self.n}:{self.m}", "nm_compliant": all(self._compliance().values()),
                "begin": self.begin, "fix": self.fix_at}

    def layer_stats(self, name: str, module: nn.Module, factor: float | None = None) -> dict:
        return {"nm": f"{self.n}:{self.m}",
                "nm_compliant": nm_compliant(torch_layout(module, module.deployed_weight()), self.n, self.m)}


@dataclass
class NMParams(Params):
    n: int = param(2, "Weights kept in every group of m (along the input channels).", ge=1)
    m: int = param(4, "Group size along the input channels.", ge=2)
    begin: float = param(0, "Step from which the N:M masks apply.", time=True)
    fix: float | None = param(None, "Step from which the masks are frozen (null: never).", time=True)
    decay: float = param(0.0, "SR-STE decay of the pruned weights.", ge=0, what="a number >= 0 (SR-STE uses 2e-4)")

    def check(self):
        ok = self.n < self.m
        return [] if ok else [("n", f"n and m must be whole numbers with 1 <= n < m, got n={self.n!r}, m={self.m!r}")]


@register
class NMMethod(Method):
    """Recipe method ``nm`` (docs/methods/nm.md); params (:class:`NMParams`): ``n`` (2) of every
    ``m`` (4) weights kept along the input channels; ``begin`` (0): first masked step; ``fix``
    (null): masks frozen from this step; ``decay`` (0): SR-STE's decay of the pruned weights."""

    name = "nm"
    description = "N:M weight sparsity (N kept in every M input channels), straight-through training"
    Params = NMParams
    group_class = NMGroup

    def out_channel_state(self, params: dict) -> bool:
        return True  # groups read in the (out, in, ...) layout

    def accepts(self, site):
        why = super().accepts(site)
        if why:
            return why
        m = int((site.params or {}).get("m", self.params["m"]))
        cin = torch_layout(site.module, site.module.weight).shape[1]
        if cin % m:
            return (f"N:M groups run along the input channels: {cin} input channel(s) per group is not a "
                    f"multiple of {m} (depthwise convs and RGB stems stay dense, as with NVIDIA ASP)")
        return None

    def apply(self, site, params) -> None:
        site.replace(NM_CLASSES[weight_base(site.module)].from_dense(
            site.module, n=params["n"], m=params["m"], decay=params["decay"]))
