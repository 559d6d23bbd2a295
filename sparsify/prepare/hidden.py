"""Weights used outside a module call, made sparse by every weight method.

Two patterns hide Conv/Linear weights from a ``call_module`` node:

* a traced forward reads ``layer.weight`` itself (a ``get_attr`` node), as torchvision's Swin does
  in its wrapped ``shifted_window_attention(x, qkv.weight, proj.weight, ...)``. The layer is
  swapped as an attribute like any other rewritten layer, and each such ``get_attr`` becomes
  ``effective_weight_of(<get_attr layer>)``: the read now returns what
  :meth:`SparseWeightMixin.effective_weight` computes, gradients included.
* ``nn.MultiheadAttention`` (a torch leaf) reads its ``in_proj_weight`` parameter (or, with
  ``kdim`` / ``vdim`` other than ``embed_dim``, its separate ``q_proj_weight`` / ``k_proj_weight`` /
  ``v_proj_weight``) and its ``out_proj.weight`` directly. It is replaced by
  :class:`SparseMultiheadAttention`, whose input projections become ``Linear`` children ``in_proj``
  (or ``q_proj`` / ``k_proj`` / ``v_proj``), so a weight method can replace them like any layer, and
  whose forward computes with the effective weights of those and of ``out_proj``.

Both are method-agnostic: any :class:`SparseWeightMixin` method gets them. ``finalize`` turns them
back into plain graphs and modules (:func:`finalize_hidden`).

>>> import torch, torchvision, sparsify
>>> vit = torchvision.models.VisionTransformer(32, 16, 1, 2, 64, 128)
>>> m = sparsify.sparsify(vit, "st3", total_steps=10, example_inputs=torch.zeros(1, 3, 32, 32))
>>> type(m.encoder.layers[0].self_attention).__name__
'SparseMultiheadAttention'
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes import Change, insert_call, remove_node, set_submodule
from passes.rewrite import recast
from passes.kept_calls import kept_call
from passes.hooks import remove_hooks

from sparsify.prepare.matching import Candidate
from sparsify.prepare.fast_path import drop_fast_path_hooks, ffn_candidates, off_nested_path
from sparsify.prepare.fast_path import no_fast_path  # noqa: F401  (pickles of SparseMultiheadAttention name it here)
from sparsify.core.forwards import note_forward
from sparsify.core.layers import WEIGHT_TYPES, SparseWeightMixin
from sparsify.prepare.hidden_positions import hidden_positions, record_read

__all__ = ["effective_weight_of", "SparseMultiheadAttention", "hidden_reads", "hidden_candidates", "convert_hidden",
           "rewire_hidden_reads", "finalize_hidden", "hidden_positions"]


@kept_call  # one graph call in every trace, torch.load's of a pickled graph included
def effective_weight_of(layer: nn.Module) -> torch.Tensor:
    """The weight ``layer`` computes with: its effective weight when sparse, else ``layer.weight``.

    >>> effective_weight_of(nn.Linear(2, 3)).shape
    torch.Size([3, 2])
    """
    if isinstance(layer, SparseWeightMixin):
        note_forward(layer)  # computed with, though its own forward never runs (sparsify.step asks)
        return record_read(layer, layer.effective_weight())
    return layer.weight


# --------------------------------------------------------------------------------------------
# get_attr reads of a layer's weight
# --------------------------------------------------------------------------------------------

def _owner_of_weight(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The local path of the Conv/Linear whose ``weight`` the ``get_attr`` ``node`` reads."""
    if node.op != "get_attr":
        return None
    owner, _, attr = str(node.target).rpartition(".")
    if attr != "weight" or not owner:
        return None
    try:
        mod = gm.get_submodule(owner)
    except AttributeError:
        return None
    return owner if isinstance(mod, WEIGHT_TYPES) else None


def hidden_reads(graphs: dict[str, fx.GraphModule]) -> list[tuple[str, str, fx.Node]]:
    """``(qualified layer name, graph prefix, get_attr node)`` of every Conv/Linear weight read
    through ``get_attr`` in ``graphs`` (``{prefix: GraphModule}``, as in ``TraceResult.graphs``)."""
    out = []
    for prefix, gm in graphs.items():
        for node in gm.graph.nodes:
            owner = _owner_of_weight(gm, node)
            if owner is not None:
                out.append((f"{prefix}.{owner}" if prefix else owner, prefix, node))
    return out


def rewire_hidden_reads(graphs: dict[str, fx.GraphModule], rewritten: set[str]) -> dict[str, list[Change]]:
    """Make every ``get_attr`` of a rewritten layer's weight read its effective weight.

    Returns the changes by graph prefix (the caller recompiles)."""
    changes: dict[str, list[Change]] = {}
    for name, prefix, node in hidden_reads(graphs):
        if name not in rewritten:
            continue
        gm = graphs[prefix]
        owner = str(node.target).rpartition(".")[0]
        layer, added = insert_call(gm, node, "get_attr", owner, before=True)
        new, called = insert_call(gm, node, "call_function", effective_weight_of, (layer,), before=True)
        new.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
        changes.setdefault(prefix, []).extend([added, called, remove_node(
            gm, node, new, detail=f"get_attr {node.target} -> effective_weight_of({owner})")])
    return changes


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------------

#: the input projections of a MultiheadAttention with kdim / vdim other than embed_dim
_SEPARATE = ("q_proj", "k_proj", "v_proj")


def _projections(mha: nn.MultiheadAttention) -> tuple[str, ...]:
    return ("in_proj",) if mha._qkv_same_embed_dim else _SEPARATE


def _load_dense_keys(module, state_dict, prefix, *args, **kwargs):
    # checkpoints of the dense model name the projections ``in_proj_weight`` / ``q_proj_weight`` ...
    for proj in ("in_proj", *_SEPARATE):
        old, new = f"{prefix}{proj}_weight", f"{prefix}{proj}.weight"
        if proj in module._modules and old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


def _linear_view(weight: nn.Parameter, training: bool = True) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight`` itself (no copy, no initialisation)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = weight
    lin.bias = None  # the bias stays in_proj_bias, read by the attention as before
    lin.train(training)
    return lin


def _effective(mha: nn.Module, proj: str) -> torch.Tensor | None:
    # None where the attention has the other layout, as torch registers it
    layer = mha._modules.get(proj)
    return None if layer is None else effective_weight_of(layer)


# what a SparseMultiheadAttention and the attention it replaces do not share (the rest is the same objects)
_OWN = ("_parameters", "_buffers", "_modules", "_load_state_dict_pre_hooks", "_forward_pre_hooks")


class SparseMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input projections are ``Linear`` children (``in_proj``
    packed, or ``q_proj`` / ``k_proj`` / ``v_proj`` when ``kdim`` / ``vdim`` differ from
    ``embed_dim``) and whose forward multiplies with their effective weights and ``out_proj``'s.

    ``in_proj_weight`` / ``q_proj_weight`` ... stay readable (they return the effective weights);
    in ``state_dict`` the parameters are ``in_proj.weight`` / ``q_proj.weight`` ..., and dense
    checkpoints still load. The inference fast path (``torch._native_multi_head_attention``) is not
    used; results are equal.

    >>> cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    >>> sparse = SparseMultiheadAttention.from_dense(cross)
    >>> [n for n, _ in sparse.named_children()], sparse.in_proj_weight, sparse.k_proj_weight is cross.k_proj_weight
    (['out_proj', 'q_proj', 'k_proj', 'v_proj'], None, True)
    >>> q, k, v = torch.randn(3, 1, 8), torch.randn(5, 1, 4), torch.randn(5, 1, 6)
    >>> torch.allclose(sparse(q, k, v)[0], cross(q, k, v)[0])
    True
    """

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention) -> "SparseMultiheadAttention":
        params = mha.__dict__.get("_parameters", {})
        if any(params.get(f"{proj}_weight") is None for proj in _projections(mha)):
            raise ValueError("only MultiheadAttention holding its input projection weights as parameters")
        new = recast(mha, cls, _OWN)
        for proj in _projections(mha):
            new.add_module(proj, _linear_view(new._parameters.pop(f"{proj}_weight"), mha.training))
        new._register_load_state_dict_pre_hook(_load_dense_keys, with_module=True)
        new.register_forward_pre_hook(no_fast_path)
        return new

    # the attributes torch's forward and callers read: effective weights, None in the other layout
    in_proj_weight = property(lambda self: _effective(self, "in_proj"))
    q_proj_weight = property(lambda self: _effective(self, "q_proj"))
    k_proj_weight = property(lambda self: _effective(self, "k_proj"))
    v_proj_weight = property(lambda self: _effective(self, "v_proj"))

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            # keep "query is key is value": the packed projection is one matmul only then
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = {}
        if "in_proj" not in self._modules:
            separate = {"use_separate_proj_weight": True, **{f"{p}_weight": _effective(self, p) for p in _SEPARATE}}
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            effective_weight_of(self.out_proj), self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal, **separate)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def to_plain(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` computing with the deployed weights."""
        plain = recast(self, nn.MultiheadAttention, _OWN)
        remove_hooks(plain, "_forward_pre_hooks", no_fast_path)  # deployed weights: the fast path is right again
        remove_hooks(plain, "_load_state_dict_pre_hooks", _load_dense_keys)
        deployed = {}
        for proj in ("in_proj", *_SEPARATE):
            layer = plain._modules.pop(proj, None)
            if layer is None:
                continue
            w = layer.deployed_weight() if isinstance(layer, SparseWeightMixin) else layer.weight.detach()
            deployed[f"{proj}_weight"] = nn.Parameter(w.clone(), requires_grad=layer.weight.requires_grad)
        # torch's order (the projections first), so state_dict keys come as a dense model's do
        plain._parameters = {**deployed, **{k: v for k, v in plain._parameters.items() if k not in deployed}}
        return plain


def _mha_candidates(root: nn.Module, winner) -> tuple[list[Candidate], list[tuple[str, nn.Module]]]:
    out, swaps = [], []
    for name, mha in list(root.named_modules()):
        if type(mha) is not nn.MultiheadAttention or any(
                mha._parameters.get(f"{p}_weight") is None for p in _projections(mha)):
            continue
        q = lambda s: f"{name}.{s}" if name else s  # noqa: E731
        probe = SparseMultiheadAttention.from_dense(mha)  # shares the parameters; replaces mha only if used
        cands = [*(Candidate(q(p), probe.get_submodule(p)) for p in _projections(mha)),
                 Candidate(q("out_proj"), mha.out_proj)]
        wins = [winner(c) for c in cands]
        if not any(w is not None and w.method is not None for w in wins):
            continue
        swaps.append((name, probe))
        out.extend(cands)
    return out, swaps


def hidden_candidates(root: nn.Module, graphs: dict[str, fx.GraphModule], winner, *,
                      called: set[str]) -> tuple[list[Candidate], list[tuple[str, nn.Module]]]:
    """Candidates for layers whose weights are read outside a module call, and the module swaps
    that make them rewritable; nothing is changed (apply the swaps with :func:`convert_hidden`).

    ``winner(candidate)`` is the rule matcher; ``called`` holds layers already reached through a
    ``call_module`` node. The swaps put a :class:`SparseMultiheadAttention` (same computation,
    same parameters) where a rule reaches a MultiheadAttention, so its projections can be
    rewritten. The candidates have no graph node: methods swap them as attributes.
    """
    out, seen = [], set(called)
    for name, prefix, node in hidden_reads(graphs):
        if name in seen:
            continue
        seen.add(name)
        out.append(Candidate(name, root.get_submodule(name)))
    mha, swaps = _mha_candidates(root, winner)
    ffn, layers = ffn_candidates(root, winner)  # nn.TransformerEncoderLayer's linear1 / linear2
    # a layer's copy first: the swap of its self_attn then lands in the copy the model holds
    return out + mha + ffn, layers + swaps


def convert_hidden(root: nn.Module, swaps: list[tuple[str, nn.Module]], names: list[str] = ()) -> list[Change]:
    """Apply the swaps :func:`hidden_candidates` returned; one Change each. ``names``: the
    candidates it returned, whose encoders leave their nested-tensor path
    (:func:`~sparsify.prepare.fast_path.off_nested_path`)."""
    changes = [Change("replace", name, "TransformerEncoder -> OpenTransformerEncoder (the sparse layers' regular "
                      "path, padded positions as torch's nested path leaves them)")
               for name in off_nested_path(root, list(names))]
    for name, new in swaps:
        old = type(root.get_submodule(name)).__name__
        set_submodule(root, name, new)
        what = f"{old} -> {type(new).__name__}" if type(new).__name__ != old else f"{old} off its inference fast path"
        changes.append(Change("replace", name, f"{what} (attribute swap)"))
    return changes


def needed_paths(graphs: dict[str, fx.GraphModule], winner) -> set[str]:
    """Modules whose forwards hold a ``get_attr`` of a weight some rule rewrites: these must be
    traced through (not kept as leaves), or the read would vanish into an opaque call."""
    needed = set()
    for name, prefix, node in hidden_reads(graphs):
        gm = graphs[prefix]
        w = winner(Candidate(name, gm.get_submodule(str(node.target).rpartition(".")[0])))
        if w is None or w.method is None:
            continue
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                needed.add(f"{prefix}.{path}" if prefix else path)
    return needed


# --------------------------------------------------------------------------------------------
# finalize and MACs
# --------------------------------------------------------------------------------------------

def finalize_hidden(root: nn.Module, graph_paths: list[str]) -> None:
    """Turn ``effective_weight_of(layer)`` back into ``get_attr layer.weight`` and every
    :class:`SparseMultiheadAttention` into a plain ``nn.MultiheadAttention`` (after the layers
    themselves were finalized)."""
    for prefix in graph_paths:
        gm = root.get_submodule(prefix) if prefix else root
        if not isinstance(gm, fx.GraphModule):
            continue
        touched = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is effective_weight_of and node.args[0].op == "get_attr":
                layer = node.args[0]
                plain, _ = insert_call(gm, node, "get_attr", f"{layer.target}.weight", before=True)
                remove_node(gm, node, plain)
                if not layer.users:
                    remove_node(gm, layer)
                touched = True
        if touched:
            gm.graph.lint()
            gm.recompile()
    drop_fast_path_hooks(root)  # transformer layers whose linear1 / linear2 were sparse
    for name, m in list(root.named_modules()):
        if isinstance(m, SparseMultiheadAttention):
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, m.to_plain())
