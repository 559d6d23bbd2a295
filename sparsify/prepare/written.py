"""The caller's tensors that ``sparsify()``'s step 0 may write, and their own copies.

In the default mode the sparse model shares the caller's parameter and buffer tensors, and
``sparsify()`` runs every group's step-0 update (docs/index.md: ``sparsify`` itself changes
nothing). A group that writes its members' tensors there (ST-3's fix at step 0, a one-shot prune)
must write a copy. A group says so with :meth:`~sparsify.core.contract.Group.writes_weights`; one
that does not say (``None``, a method written outside the library) and has its own ``update`` gets
copies of every caller tensor its members hold, and after step 0 the copies it left unchanged are
dropped again, so the model shares what was not written.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from sparsify.core.contract import Group

__all__ = ["step_zero_writes", "own_written_weights", "share_unwritten", "values_written_at_start",
           "put_values_back"]


def _may_write(group: Group) -> bool | None:
    """True / False as the group declares for step 0; None: undeclared and it has an update."""
    declared = group.writes_weights(0)
    if declared is None:
        return None if type(group).update is not Group.update else False
    return bool(declared)


def _tensors(member: nn.Module, weight_only: bool):
    if weight_only:
        return [("weight", member)] if isinstance(getattr(member, "weight", None), nn.Parameter) else []
    return [(name, m) for m in member.modules()
            for name in (*m._parameters, *m._buffers) if getattr(m, name, None) is not None]


def _may_be_written(groups):
    """``(tensor, declared)`` for every tensor of a member that its group may write at step 0:
    the weights of a group that declares it writes, every tensor of one that does not say."""
    for g in groups:
        may = _may_write(g)
        if may is False:
            continue
        for member in g.members.values():
            for name, m in _tensors(member, weight_only=may is True):
                yield getattr(m, name), may is True


def own_written_weights(root: nn.Module, groups, caller: set[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give the caller's tensors (ids in ``caller``) that a group may write at step 0 their own copy
    in every module of ``root`` that holds them (tied weights stay tied). Returns ``(original, copy)``
    of the copies made for undeclared groups, for :func:`share_unwritten` after step 0.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> class Pruning(Group):  # an update that declares nothing
    ...     def update(self, step, loss=None): ...
    >>> net = torch.nn.Linear(2, 2)
    >>> g = Pruning(SimpleNamespace(name="p"), {}, {"": net}, None)
    >>> pairs = own_written_weights(net, [g], {id(net.weight), id(net.bias)})
    >>> len(pairs), net.weight is pairs[0][1] or net.weight is pairs[1][1]
    (2, True)
    """
    written: dict[int, torch.Tensor] = {}
    checked: set[int] = set()
    for t, declared in _may_be_written(groups):
        if id(t) in caller:
            written[id(t)] = t
            if not declared:
                checked.add(id(t))
    copies = {i: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
              else t.detach().clone() for i, t in written.items()}
    _put(root, copies)
    return [(written[i], copies[i]) for i in checked]


def _put(root: nn.Module, by_id: dict[int, torch.Tensor]) -> None:
    """Register ``by_id[id(t)]`` instead of ``t`` wherever a module of ``root`` holds ``t`` as a
    parameter or buffer (every holder: tied tensors stay tied)."""
    if not by_id:
        return
    for module in root.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in by_id:
                    store[name] = by_id[id(t)]


def share_unwritten(root: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the caller's tensor back wherever step 0 left its copy equal to it (compared by value:
    a write through ``.data`` does not count as a version change), so the model shares it again."""
    # (a meta tensor has no values to write: shared again as it is)
    _put(root, {id(c): o for o, c in pairs if o.is_meta or torch.equal(o, c)})


def values_written_at_start(groups) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, a copy of its values)`` for every tensor a group may write at step 0, found as
    :func:`own_written_weights` finds them: ``sparsify(..., inplace=True)`` writes the caller's
    own, and a failure after step 0 (a method's effective weight refused) puts them back with
    :func:`put_values_back` (docs/recipes.md: a failed call leaves the caller's model as it was).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> class Pruning(Group):
    ...     def update(self, step, loss=None): ...
    >>> net = torch.nn.Linear(2, 2)
    >>> saved = values_written_at_start([Pruning(SimpleNamespace(name="p"), {}, {"": net}, None)])
    >>> with torch.no_grad(): _ = net.weight.zero_()
    >>> put_values_back(saved); bool(net.weight.eq(0).all())
    False
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t, _ in _may_be_written(groups):
        if id(t) not in out and not t.is_meta:
            out[id(t)] = (t, t.detach().clone())
    return list(out.values())


def put_values_back(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write back the values :func:`values_written_at_start` copied."""
    with torch.no_grad():
        for t, values in saved:
            t.copy_(values)


@contextlib.contextmanager
def step_zero_writes(root: nn.Module, groups, caller: set[int] | None, inplace: bool) -> Iterator[None]:
    """Around step 0 (the groups' ``update(0)`` and what may refuse after it): the caller's tensors
    (ids in ``caller``, the default mode) that a group may write get copies first, and those left
    unchanged are shared again after (:func:`own_written_weights`, :func:`share_unwritten`); under
    ``inplace`` the values a group may write are copied and put back if anything inside raises
    (:func:`values_written_at_start`)."""
    groups = list(groups)
    pairs = own_written_weights(root, groups, caller) if caller else []
    saved = values_written_at_start(groups) if inplace else []
    try:
        yield
    except BaseException:
        put_values_back(saved)
        raise
    share_unwritten(root, pairs)
