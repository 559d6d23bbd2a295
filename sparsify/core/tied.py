"""Tied weights: one ``nn.Parameter`` registered in two modules (an embedding tied to the LM head,
``tie_word_embeddings``), sparsified with one mask for both uses.

The weight layer a method rewrites owns the mask (or threshold); every other module registered
with the same parameter becomes a *tied user*: it keeps that parameter registered as its own
``weight`` (so ``state_dict`` keys, ``named_parameters`` and the tie itself are unchanged) but
computes with the owner's effective weight, gradients included:

* ``nn.Embedding`` -> :class:`TiedEmbedding`: ``F.embedding(x, owner.effective_weight(), ...)``;
* a subclass of it with its own forward (a scaled embedding) -> ``Tied<Class>``
  (:func:`tied_forward_class`), whose ``weight`` reads as the owner's effective weight;
* a weight layer of the owner's class and weight shape (two Linears sharing a matrix) ->
  ``Tied<Class>`` (:data:`TIED_CLASSES`), whose effective weight is the owner's.

``finalize`` gives the owner a plain layer holding the deployed weight and then the users plain
modules registered with that same parameter (:func:`plain_tied`), so the tie survives.

>>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
>>> head.weight = emb.weight
>>> user = tied_user(emb, head, "head")
>>> type(user).__name__, user.weight is head.weight
('TiedEmbedding', True)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from passes.rewrite import recast

from sparsify.core.forwards import note_forward
from sparsify.core.layers import SparseWeightMixin, specialize, weight_base, WEIGHT_TYPES

__all__ = ["TiedUse", "TiedEmbedding", "TiedForwardMixin", "tied_forward_class", "TiedWeightMixin", "TIED_CLASSES",
           "tied_user", "why_not_shared", "plain_tied"]


class TiedUse:
    """Marks a tied user; ``tied_to`` is the owner's qualified name, ``owner()`` the owner layer
    (held without registering it, so it is not a second path to the same module)."""

    tied_to: str = ""

    def owner(self) -> nn.Module:
        return self.__dict__["_tied_owner"]

    def bind(self, owner: nn.Module, name: str) -> None:
        object.__setattr__(self, "_tied_owner", owner)
        self.tied_to = name

    def owner_weight(self) -> torch.Tensor:
        """What the owner computes with: its effective weight once it is a sparse layer (its weight
        as it is when it was given one of another shape, as ``resize_token_embeddings`` does: the
        model then computes it dense, see :func:`sparsify.core.state.forget_replaced`)."""
        owner = self.owner()
        note_forward(owner)  # computed with here too (sparsify.step asks whether any sparse layer was)
        if isinstance(owner, SparseWeightMixin) and not owner.resized():
            return owner.effective_weight()
        return owner.weight


class TiedEmbedding(TiedUse, nn.Embedding):
    """An ``nn.Embedding`` looking rows up in its owner's effective weight."""

    def forward(self, x):
        return F.embedding(x, self.owner_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tied_to={self.tied_to}"


class TiedForwardMixin(TiedUse):
    """In front of an ``nn.Embedding`` subclass with its own forward (Gemma's and BART's scaled
    word embeddings: the lookup times a constant): inside that forward ``self.weight`` reads as
    the owner's effective weight, so it runs unchanged on it. Outside, ``weight`` is the shared
    parameter, still registered (transformers' ``tie_weights`` and embedding utilities see it)."""

    def forward(self, *args, **kwargs):
        self.__dict__["_in_forward"] = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["_in_forward"] = False

    @property
    def weight(self) -> torch.Tensor:
        return self.owner_weight() if self.__dict__.get("_in_forward") else self._parameters["weight"]

    @weight.setter
    def weight(self, value) -> None:
        self._parameters["weight"] = value

    def original_class(self) -> type:
        return type(self).__bases__[1]

    def __reduce_ex__(self, protocol):
        # the class is made at run time: pickled as the user's class it derives from
        return _rebuild_tied, (self.original_class(), self.__dict__.copy())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tied_to={self.tied_to}"


_TIED_FORWARD: dict[type, type] = {}


def tied_forward_class(cls: type) -> type:
    """``Tied<cls>``: :class:`TiedForwardMixin` in front of ``cls`` (made once per class)."""
    if cls not in _TIED_FORWARD:
        name = f"Tied{cls.__name__}"
        _TIED_FORWARD[cls] = type(name, (TiedForwardMixin, cls), {"__module__": __name__, "__qualname__": name})
    return _TIED_FORWARD[cls]


def _rebuild_tied(cls: type, state: dict) -> nn.Module:
    new = object.__new__(tied_forward_class(cls))
    new.__setstate__(state)
    return new


class TiedWeightMixin(TiedUse, SparseWeightMixin):
    """A weight layer computing with its owner's effective weight (same class, same shape)."""

    def effective_weight(self) -> torch.Tensor:
        return self.owner_weight()

    @torch.no_grad()
    def deployed_weight(self) -> torch.Tensor:
        owner = self.owner()
        return owner.deployed_weight() if isinstance(owner, SparseWeightMixin) else owner.weight.detach()

    def sparse_repr(self) -> str:
        return f"tied_to={self.tied_to}"


TIED_CLASSES = specialize(TiedWeightMixin, prefix="Tied")


def why_not_shared(user: nn.Module, owner: nn.Module) -> str:
    """Why ``user`` (a module registered with ``owner``'s weight) cannot read the owner's
    effective weight; "" when it can.

    >>> emb, head = nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 5, bias=False)
    >>> why_not_shared(emb, head)
    'an Embedding with max_norm renormalises its weight in place'
    """
    if isinstance(user, nn.Embedding):  # subclasses too: they read the weight through self.weight
        if user.max_norm is not None:
            return "an Embedding with max_norm renormalises its weight in place"
        if user.sparse:
            return "an Embedding with sparse=True needs a leaf weight for its sparse gradient"
        return "" if user.weight.shape == owner.weight.shape else "its weight has another shape"
    if isinstance(user, WEIGHT_TYPES) and type(user) is weight_base(owner):
        return "" if user.weight.shape == owner.weight.shape else "its weight has another shape"
    return f"a {type(user).__name__} reads the weight in its own forward (only an nn.Embedding or a " \
           f"{weight_base(owner).__name__} can read the owner's effective weight)"


def tied_user(user: nn.Module, owner: nn.Module, owner_name: str) -> nn.Module:
    """``user`` as a tied user of ``owner`` (see the module docstring), sharing its parameters."""
    cls = (TiedEmbedding if type(user) is nn.Embedding else
           tied_forward_class(type(user)) if isinstance(user, nn.Embedding) else TIED_CLASSES[type(user)])
    new = recast(user, cls, ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"))
    new.bind(owner, owner_name)
    return new


def plain_tied(user: TiedUse, weight: nn.Parameter) -> nn.Module:
    """The plain module ``user`` finalizes to, registered with ``weight`` (the finalized owner's)."""
    cls = (nn.Embedding if isinstance(user, TiedEmbedding) else
           user.original_class() if isinstance(user, TiedForwardMixin) else weight_base(user))
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in user.__dict__.items():
        if not k.startswith("_") and k not in ("training", "tied_to"):
            new.__dict__[k] = v
    new.training = user.training
    new.weight = weight
    for name, p in user._parameters.items():
        if name != "weight":
            new.register_parameter(name, None if p is None else nn.Parameter(p.detach().clone(),
                                                                              requires_grad=p.requires_grad))
    for name, b in user._buffers.items():  # a scaled embedding's scale
        new.register_buffer(name, None if b is None else b.detach().clone(),
                            persistent=name not in user._non_persistent_buffers_set)
    return new
