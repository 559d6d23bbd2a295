"""Penalty terms recorded in the forward and collected by ``sparsify.penalty``: the layer side
(:class:`RecordsMixin`) and the group side (:class:`RecordsGroupMixin`) that every penalty method
(the activation regularizers, ``l1-prune``) shares.

A term is recorded by a training-mode forward with gradients. A forward that runs again inside
``backward()`` records nothing: activation checkpointing recomputes forwards there, and the first
run already recorded the term (a term recorded again could not reach the loss and would only be
reported as never collected). The re-run still computes it: non-reentrant checkpointing checks
that a re-run saves the tensors the first run saved. Reentrant checkpointing
(``use_reentrant=True``) runs the first forward without gradients, so a term inside it can never
reach the loss: the group says so.
"""
from __future__ import annotations

import torch

__all__ = ["RecordsMixin", "RecordsGroupMixin", "in_backward", "backpropagated", "graph_holders", "penalty_sum"]


def in_backward() -> bool:
    """Whether the calling code runs inside an autograd backward pass (e.g. a checkpointed forward
    being recomputed).

    >>> in_backward()
    False
    """
    if torch.compiler.is_compiling():  # no graph break for the C call: a compiled forward keeps its terms
        return False
    return torch._C._current_graph_task_id() != -1


def backpropagated(term: torch.Tensor, limit: int = 64) -> bool:
    """Whether a ``backward()`` already ran through the graph ``term`` was computed from, and freed
    it (its saved tensors are gone): a term of a micro-batch whose loss was backpropagated without
    it cannot reach a later loss. Looks at up to ``limit`` autograd nodes behind ``term``.

    >>> w = torch.ones(3, requires_grad=True)
    >>> x = torch.relu(2 * w)
    >>> term = x.abs().mean()
    >>> backpropagated(term)
    False
    >>> x.sum().backward()  # another loss over the same activation, without the term
    >>> backpropagated(term)
    True
    """
    todo, seen = [term.grad_fn], 0
    while todo and seen < limit:
        node = todo.pop()
        if node is None:
            continue
        seen += 1
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    getattr(node, name)
                except RuntimeError as e:
                    if "freed" in str(e):
                        return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def graph_holders(root) -> list[str]:
    """``module.attribute`` of each attribute of ``root``'s modules holding a tensor of a live
    autograd graph (a non-leaf), directly or in a list, tuple or dict: what ``copy.deepcopy``
    refuses. A :class:`RecordsMixin` module's ``records`` is copied empty, so it is not listed.

    >>> m = torch.nn.Linear(1, 1)
    >>> m.kept = [m(torch.ones(1))]
    >>> graph_holders(torch.nn.Sequential(m))
    ['0.kept']
    """
    def live(v) -> bool:
        if isinstance(v, torch.Tensor):
            return v.grad_fn is not None
        if isinstance(v, (list, tuple)):
            return any(live(x) for x in v)
        return isinstance(v, dict) and any(live(x) for x in v.values())
    return [f"{name or '<root>'}.{key}" if name else key for name, m in root.named_modules()
            for key, v in vars(m).items()
            if not key.startswith("_") and not (key == "records" and isinstance(m, RecordsMixin)) and live(v)]


class RecordsMixin:
    """For modules that keep penalty terms of the current forward in ``self.records``.

    Those terms belong to the live autograd graph, so copies (``copy.deepcopy``, as ``finalize``
    makes) and pickles start with no records instead of dragging the graph along.
    """

    records: list
    _recorded = False  # a term was recorded since the last step
    _lost = 0  # forwards that ran with gradients only inside backward since the last step
    _evaluated = 0  # eval-mode forwards with gradients since the last step (trained in eval mode?)

    def recording(self) -> bool:
        """Whether this forward computes its term: training mode with gradients. An eval-mode
        forward with gradients is counted: when a step saw only those, the model was trained in
        eval mode, where no term is recorded."""
        if self.training:
            return torch.is_grad_enabled()
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not in_backward():
            self._evaluated += 1
        return False

    def record(self, term: torch.Tensor) -> None:
        """Keep ``term`` for ``sparsify.penalty``, unless this forward is a re-run inside backward.
        The re-run still computes the term: non-reentrant checkpointing checks that it saves the
        tensors the first run saved."""
        if in_backward():
            if not self._recorded:
                self._lost += 1
            return
        self._recorded = True
        self.records.append(term)

    def pop(self) -> list[torch.Tensor]:
        out, self.records = self.records, []
        return out

    def loaded(self) -> None:
        """``load_state_dict`` is replacing the weights: the terms recorded so far hold the old ones
        in their graph (see ``load_check.py``), so they go; a module measuring something from its
        forwards starts over too."""
        self.records = []

    def clear_records(self) -> tuple[int, int, int]:
        """Forget this step's terms: ``(terms never collected, forwards whose term was lost,
        eval-mode forwards with gradients in a step that recorded nothing)``."""
        left, lost, evaluated = len(self.records), self._lost, 0 if self._recorded else self._evaluated
        self.records, self._recorded, self._lost, self._evaluated = [], False, 0, 0
        return left, lost, evaluated

    def __getstate__(self):
        state = self.__dict__.copy()
        state["records"] = []
        return state

    def __deepcopy__(self, memo):
        import copy
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = [] if k == "records" else copy.deepcopy(v, memo)
        return new


class RecordsGroupMixin:
    """Group side: :meth:`penalty` sums the members' terms, :meth:`clear` (every ``sparsify.step``)
    counts what was left or lost, :meth:`warnings` says what to do about it. ``record_noun`` names
    the members in the warnings."""

    record_noun = "layers"
    evaluated = 0  # eval-mode forwards with gradients in steps that recorded no term (trained in eval mode)

    def _init_records(self) -> None:
        self.uncollected = 0
        self.lost = 0

    def penalty(self):
        pending = [m.pop() for m in self.members.values()]
        # several forwards since the last collection: an earlier one may have been backpropagated alone
        if any(len(ts) > 1 and any(backpropagated(t) for t in ts[:-1]) for ts in pending):
            raise RuntimeError(
                f"sparsify.penalty: the {self.method_name} penalty holds terms of earlier forwards whose loss was "
                "already backpropagated without them (gradient accumulation with the penalty added on the last "
                "micro-batch only), and backward() freed their graphs: add sparsify.penalty(model) to every "
                "micro-batch's loss, scaled as that loss is")
        terms = [t for ts in pending for t in ts]
        return penalty_sum(terms) if terms else None

    def clear(self) -> None:
        for m in self.members.values():
            left, lost, evaluated = m.clear_records()
            self.uncollected += left
            self.lost += lost
            self.evaluated += evaluated

    def warnings(self) -> list[str]:
        out = []
        if self.uncollected:
            out.append(f"sparsify: the {self.method_name} {self.record_noun} recorded a penalty that was never "
                       "collected: add sparsify.penalty(model) to the loss before backward()")
        if self.lost:
            out.append(f"sparsify: the {self.method_name} {self.record_noun} ran their training forward with "
                       "gradients only inside backward(), so their penalty never reached the loss: reentrant "
                       "activation checkpointing runs the first forward without gradients; use "
                       "use_reentrant=False (transformers: gradient_checkpointing_enable("
                       "gradient_checkpointing_kwargs={'use_reentrant': False}))")
        if self.evaluated:
            out.append(f"sparsify: the {self.method_name} {self.record_noun} ran in eval mode with gradients and "
                       "recorded no penalty before a sparsify.step: the model trained in eval mode (model.eval() "
                       "left on), where the recipe's penalty is not computed; call model.train() before the "
                       "training forwards")
        return out


def penalty_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """The sum of one-element penalty ``terms`` in float32 (a bfloat16 model's terms summed without
    its rounding), in float64 when a term is (a float64 model's: rounding it to float32 would lose
    what its loss keeps); ``terms`` share a device.

    >>> penalty_sum([torch.ones(1, dtype=torch.bfloat16), torch.ones(())]).dtype
    torch.float32
    >>> penalty_sum([torch.ones((), dtype=torch.float64), torch.ones(())]).dtype
    torch.float64
    """
    wide = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(wide).reshape(()) for t in terms]).sum()
