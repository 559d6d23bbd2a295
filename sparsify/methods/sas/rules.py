"""Slot rules: how SAS lifts one input element into M slots (docs/methods/sas.md)."""
from __future__ import annotations

import math
from statistics import NormalDist

import torch




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
