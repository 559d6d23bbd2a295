"""The node semi-structured activation sparsity inserts after each selected conv
(:class:`PositionMask`: ``y = conv(x) ⊙ m[h, w]``) and what ``finalize`` keeps of it
(:class:`DeployedPositionMask`), and the 0/1 map a mask holds (:func:`position_mask`). The group
that draws, schedules and freezes the maps is :mod:`sparsify.methods.semistructured.group`; the
package re-exports both classes (pickles made when the method was one module name them there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.forwards import entered

__all__ = ["PositionMask", "DeployedPositionMask", "Calls", "Sizes", "sizes_of", "FIX", "position_mask"]

FIX = "give sparsify(...) example_inputs at the resolution you train at"  # the advice of a size error


class Calls:
    """The call order of one group's masks. A conv that a head runs on every feature level
    (torchvision's RPN / RetinaNet / FCOS heads, whose untraceable parent leaves one mask for all
    levels) changes size between calls while the other convs keep theirs; a model run at another
    resolution changes every conv's size in turn. Only the order tells the two apart: a mask does
    not see where the model's forward begins."""

    def __init__(self):
        self.tick = 0
        self.sizes: list[Sizes] = []


class Sizes:
    """The output sizes one mask's conv was called at (eager forwards), and whether they show a
    conv shared across feature levels (``shared``: no single mask fits; the mask stays off)."""

    def __init__(self, calls: Calls | None = None):
        self.calls = calls if calls is not None else Calls()
        self.calls.sizes.append(self)
        self.shared = False
        self.trained: tuple[int, int] | None = None  # the size of the latest forward with gradients
        self.forget()

    def forget(self) -> None:
        """Start over (before the one forward that sizes the masks; ``shared`` stays)."""
        self.seen: list[tuple[int, int]] = []  # distinct sizes, in the order first seen
        self.size: tuple[int, int] | None = None
        self.since = 0  # the tick of the call that set ``size``
        self.last = 0  # the tick of the latest call
        self.resized: int | None = None  # the tick of the latest size change

    def call(self, size: tuple[int, int]) -> bool:
        """Note a call at ``size``; True once the conv is known to be shared."""
        calls = self.calls
        calls.tick += 1
        t = calls.tick
        if self.shared:
            return True
        if size != self.size:
            if self.size is not None:
                # another conv ran at one size between this conv's last two size changes: the
                # model's resolution did not change, this conv runs at several sizes per forward
                # (a conv whose size no input changes, after an adaptive pool, would be taken for
                # such a witness; the forward that sparsify() runs catches the common case exactly)
                p = self.resized
                if p is not None and any(o is not self and o.since <= p < o.last for o in calls.sizes):
                    self.shared = True
                self.resized = t
            self.size, self.since = size, t
            if size not in self.seen:
                self.seen.append(size)
        self.last = t
        return self.shared


def sizes_of(mask: nn.Module) -> Sizes:
    """``mask``'s :class:`Sizes`, made on first use. In ``__dict__``, not a buffer or submodule:
    ``nn.DataParallel``'s replicas (shallow copies) share it, deep copies copy it with its
    group's :class:`Calls`."""
    sizes = mask.__dict__.get("_sizes")
    if sizes is None:
        sizes = mask.__dict__["_sizes"] = Sizes()
    return sizes


class PositionMask(nn.Module):
    """Multiplies a conv output ``(N, C, H, W)`` by the 0/1 buffer ``mask`` of shape ``(H, W)``.

    For deployment (patch-skipping convs): the positions where ``mask == 0`` are output
    positions of the preceding conv that need not be computed at all (their im2col columns are
    dropped); the conv's bias is masked too (the mask applies to ``conv(x) + b``). ``mask`` has
    shape ``(0, 0)`` and the node is the identity until the layer's output size is known and a
    sparsity > 0 is scheduled. ``enabled`` is False while the mask has no zero (then the forward
    returns its input as is). Masks apply in train and eval mode alike, with no rescaling.

    A conv called at several output sizes per forward (one head run on every feature level of an
    FPN, behind a parent torch.fx could not trace) cannot hold one mask: once its :class:`Sizes`
    show it, the node stays the identity (the group keeps its mask all ones and says so).

    When BatchNorm is folded into the conv, the masked positions of the *folded* layer must hold
    the folded bias ``β − γμ/sqrt(σ²+ε)``, not 0: compute ``conv_without_bias(x) ⊙ mask + b_folded``.
    """

    calls_entered = True  # its forward calls sparsify.core.forwards.entered (no pre-hook needed)

    def __init__(self, mask: torch.Tensor | None = None, layer: str = ""):
        super().__init__()
        self.layer = layer  # the conv it masks, for messages (its own name sits beside it: features_0_pmask)
        self.fix = FIX  # what a size error advises (the group names a detector's own resizing instead)
        self.register_buffer("mask", torch.ones(0, 0) if mask is None else mask.detach().float().clone())
        self.size: tuple[int, int] | None = tuple(self.mask.shape) if mask is not None else None
        self.enabled = bool(self.mask.numel()) and bool((self.mask == 0).any())

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        if tuple(self.mask.shape) != tuple(mask.shape):
            self.mask = torch.empty(mask.shape, dtype=torch.float32, device=self.mask.device)
        self.mask.copy_(mask)
        self.enabled = bool((mask == 0).any())

    def forward(self, y):
        entered(self, y)
        size = (int(y.shape[-2]), int(y.shape[-1]))
        # eager only: under torch.compile reading the call counter would guard, and recompile,
        # on every call (the forward sparsify() runs has already found the shared convs)
        if not torch.compiler.is_compiling():
            sizes = sizes_of(self)
            if torch.is_grad_enabled():  # read by the group's next update (a training resolution check)
                sizes.trained = size
            if sizes.call(size):
                self.enabled = False  # shared across levels: no single mask fits (the group resets it)
                self.size = size
                return y
        if self.enabled and size != tuple(self.mask.shape):
            raise RuntimeError(
                f"PositionMask: the mask is {tuple(self.mask.shape)} but {self.layer or 'this conv'}'s output is {size}: "
                "semi-structured masks mask output positions of one input resolution; run the model at the "
                f"resolution its masks were made for (train and evaluate alike), and "
                f"{getattr(self, 'fix', FIX)}")  # (pickled before it had one: FIX)
        if self.size is None:  # the first forward (sparsify()'s, on example_inputs) sizes the masks
            self.size = size
        return y * self.mask.to(y.dtype) if self.enabled else y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "mask"
        if key in state_dict and state_dict[key].shape != self.mask.shape:
            self.mask = torch.empty_like(state_dict[key], device=self.mask.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.mask.numel():  # the masks of the run saved: their size is the one to keep
            self.size = tuple(self.mask.shape)
        shared = "_sizes" in self.__dict__ and self.__dict__["_sizes"].shared
        self.enabled = bool(self.mask.numel()) and bool((self.mask == 0).any()) and not shared

    def extra_repr(self) -> str:
        if not self.mask.numel():
            return "mask=unset"
        zeros = int((self.mask == 0).sum())
        return f"mask={tuple(self.mask.shape)}, dropped={zeros}/{self.mask.numel()}"


class DeployedPositionMask(PositionMask):
    """What ``finalize`` keeps of a :class:`PositionMask` with zeros: ``y ⊙ mask`` and the size
    check, nothing of the training bookkeeping, so that ``torch.jit.script`` compiles it and
    ``torch.jit.trace`` records it without warnings.

    >>> m = DeployedPositionMask(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    >>> m(torch.ones(1, 1, 2, 2))[0, 0]
    tensor([[1., 0.],
            [1., 1.]])
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.is_quantized:
            # eager torch.ao.quantization handed it a quantized conv's output; even with the
            # multiply made to work, that mode cannot run a finalized model (its trace keeps no
            # QuantStub / FloatFunctional, and conv+BN fusion by names would cross the mask)
            raise RuntimeError("PositionMask: " + (self.layer if self.layer else "this conv") + "'s output is "
                               "quantized: eager-mode quantization (torch.ao.quantization prepare/convert) of a "
                               "semi-structured model is not supported; use FX graph mode (prepare_fx/convert_fx "
                               "with DeployedPositionMask as a non-traceable module class), see docs/deployment.md")
        # (a trace records the sizes as tensors: comparing them would warn, and the traced
        # graph is for the traced size anyway)
        if not torch.jit.is_tracing() and (y.shape[-2] != self.mask.shape[0] or y.shape[-1] != self.mask.shape[1]):
            # (concatenated: torch.jit.script compiles this forward)
            raise RuntimeError("PositionMask: the mask is (" + str(self.mask.shape[0]) + ", " + str(self.mask.shape[1])
                               + ") but " + (self.layer if self.layer else "this conv") + "'s output is ("
                               + str(y.shape[-2]) + ", " + str(y.shape[-1]) + "): run the model at the input "
                               "resolution it was trained at")
        return y * self.mask.to(y.dtype)


def position_mask(scores: torch.Tensor, size: tuple[int, int], sparsity: float) -> torch.Tensor:
    """The float32 ``(H, W)`` 0/1 mask for one layer: ``scores`` (the input-resolution map)
    avg-pooled to ``size``, then its ``round(sparsity·H·W)`` lowest positions set to 0 (ties broken
    by position, so equal inputs give equal masks).

    >>> m = position_mask(torch.rand(32, 32), (8, 8), 0.25)
    >>> int((m == 0).sum())
    16
    """
    h, w = int(size[0]), int(size[1])
    pooled = F.adaptive_avg_pool2d(scores.float()[None, None], (h, w))[0, 0].reshape(-1)
    k = int(round(sparsity * h * w))
    mask = torch.ones(h * w, dtype=torch.float32, device=scores.device)
    if k > 0:
        order = torch.sort(pooled, stable=True).indices
        mask[order[:k]] = 0.0
    return mask.reshape(h, w)
