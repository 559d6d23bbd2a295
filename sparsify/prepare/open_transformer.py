"""torch's transformer modules on their regular path, so that a trace reaches the activation inside.

``nn.TransformerEncoderLayer`` and its relatives are ``torch.nn`` modules, which torch.fx keeps
whole: the activation between ``linear1`` and ``linear2`` (``F.relu`` or ``F.gelu``, or a module
given as ``activation=``) is never a node, so a recipe that inserts nodes after activations
(tl1, the activation regularizers, dual, SAS on the feed-forward block) matched nothing there.
Their forwards cannot be traced as they are either: they choose between the fused inference
kernel and the regular path with Python tests on their inputs.

When a recipe inserts nodes, :func:`open_transformers` changes the class of every such module to a
subclass here whose forward is the regular path written traceable: the same calls of the same
submodules (``_sa_block``, ``_mha_block``, ``_ff_block`` are torch's own), minus the fused paths,
which compute the same function. Differences, none in the values computed:

* masks are passed to the attention as given; ``nn.MultiheadAttention`` turns boolean masks into
  additive ones itself, as the torch layer would have before calling it;
* an encoder or decoder passes ``is_causal`` on as a flag (``None`` is false): torch's guess that a
  given mask is the causal one only chooses a kernel;
* where torch's encoder would run its layers on a nested tensor (eval, no gradients, a padding
  mask, ``use_nested_tensor``: :func:`goes_nested` holds its conditions), the padded positions of
  its output are zero before its ``norm``, as the nested path leaves them (:func:`torch_pads`);
* ``nn.Transformer``'s checks of the shapes of ``src`` and ``tgt`` are left to the layers.

``finalize`` gives every module its torch class back (:func:`close_transformers`): the fused
inference paths are right again once the deployed weights are in the tensors.

>>> import torch, sparsify
>>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
>>> m = sparsify.sparsify(enc, "tl1", total_steps=10, example_inputs=torch.zeros(1, 4, 16))
>>> [e.name for e in sparsify.plan(enc, "tl1", example_inputs=torch.zeros(1, 4, 16)).entries if e.method]
['relu']
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["OPENED", "open_transformers", "close_transformers", "goes_nested", "torch_pads"]


def _first_layer_tensors(layer: nn.Module) -> tuple:
    attn = layer.self_attn
    in_proj = attn._parameters.get("in_proj_weight")  # a SparseMultiheadAttention holds it as in_proj.weight
    return (attn.in_proj.weight if in_proj is None else in_proj, attn.in_proj_bias, attn.out_proj.weight,
            attn.out_proj.bias, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
            layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)


def goes_nested(encoder: nn.TransformerEncoder, src, mask, key_padding_mask) -> bool:
    """Would ``nn.TransformerEncoder.forward`` run ``encoder``'s layers on a nested tensor for this
    call? torch's own conditions (torch 2.11 to 2.14), in its order.

    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1).eval()
    >>> x, pad = torch.zeros(2, 3, 8), torch.tensor([[False, False, True], [False, False, False]])
    >>> with torch.no_grad():
    ...     goes_nested(enc, x, None, pad), goes_nested(enc, x, None, None)
    (True, False)
    >>> goes_nested(enc, x, None, pad)  # gradients on
    False
    """
    return _goes_nested(encoder.layers[0], getattr(encoder, "use_nested_tensor", False),
                        getattr(encoder, "mask_check", True), src, mask, key_padding_mask)


def _goes_nested(first: nn.Module, use_nested: bool, check: bool, src, mask, key_padding_mask) -> bool:
    if (not torch.backends.mha.get_fastpath_enabled() or not use_nested or first.training or src.dim() != 3
            or key_padding_mask is None):
        return False
    pad = F._canonical_mask(mask=key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(mask),
                            other_name="mask", target_type=src.dtype)
    if check and (torch.compiler.is_compiling() or not torch._nested_tensor_from_mask_left_aligned(
            src, pad.logical_not())):
        return False
    if src.is_nested or mask is not None or torch.is_autocast_enabled():
        return False
    tensors = (src, *_first_layer_tensors(first))
    devices = ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name)
    return not (torch.overrides.has_torch_function(tensors) or src.device.type not in devices
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def torch_pads(first: nn.Module, use_nested: bool, check: bool, src, mask, key_padding_mask, out):
    """``out``, the output of an encoder's last layer, with its padded positions zero where torch
    would have run the layers on a nested tensor (:func:`goes_nested`; ``first``: the first layer,
    ``use_nested`` / ``check``: the encoder's ``use_nested_tensor`` / ``mask_check``): the values
    torch's encoder gives there. A leaf of every trace, called at run time: it depends on the mode
    and on whether gradients are on."""
    if not _goes_nested(first, use_nested, check, src, mask, key_padding_mask):
        return out
    pad = F._canonical_mask(mask=key_padding_mask, mask_name="src_key_padding_mask", other_type=None,
                            other_name="", target_type=src.dtype, check_other=False)
    return out.masked_fill((pad != 0).unsqueeze(-1), 0.0)  # torch keeps the positions where the mask is 0


torch.fx.wrap("torch_pads")


class OpenTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` on its regular path only (traceable)."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class OpenTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer``, whose forward traces as it is: only its class changes, so
    that torch.fx does not keep it whole."""


class OpenTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without its nested-tensor path (traceable)."""

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
        out = torch_pads(self.layers[0], getattr(self, "use_nested_tensor", False), getattr(self, "mask_check", True),
                         src, mask, src_key_padding_mask, out)
        return self.norm(out) if self.norm is not None else out


class OpenTransformerDecoder(nn.TransformerDecoder):
    """``nn.TransformerDecoder`` without its guess of a causal mask (traceable)."""

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        out = tgt
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask,
                        memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return self.norm(out) if self.norm is not None else out


class OpenTransformer(nn.Transformer):
    """``nn.Transformer`` without its input checks (traceable)."""

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


#: torch's class -> the class :func:`open_transformers` gives it
OPENED = {nn.TransformerEncoderLayer: OpenTransformerEncoderLayer,
          nn.TransformerDecoderLayer: OpenTransformerDecoderLayer,
          nn.TransformerEncoder: OpenTransformerEncoder,
          nn.TransformerDecoder: OpenTransformerDecoder,
          nn.Transformer: OpenTransformer}
_CLOSED = {v: k for k, v in OPENED.items()}


def _swap_classes(root: nn.Module, classes: dict, names: list[str] | None) -> list[str]:
    """Give every module of ``root`` whose exact class ``classes`` maps (those in ``names``,
    default all) the class it maps to; returns their qualified names."""
    swapped = []
    for name, m in root.named_modules():
        if type(m) in classes and (names is None or name in names):
            m.__class__ = classes[type(m)]
            swapped.append(name)
    return swapped


def open_transformers(root: nn.Module, names: list[str] | None = None) -> list[str]:
    """Give every torch transformer module of ``root`` (exactly torch's class, not a subclass with
    its own forward; those in ``names``, default all) its traceable class; returns their qualified
    names. The module objects stay the same (parameters, children, hooks, ``state_dict`` keys),
    only ``__class__`` changes.

    >>> layer = nn.TransformerEncoderLayer(8, 2, 16)
    >>> open_transformers(nn.Sequential(layer)), type(layer).__name__
    (['0'], 'OpenTransformerEncoderLayer')
    """
    return _swap_classes(root, OPENED, names)


def close_transformers(root: nn.Module, names: list[str] | None = None) -> list[str]:
    """Give the opened modules of ``root`` (those in ``names``, default all) torch's class back;
    returns their names.

    >>> seq = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16)); _ = open_transformers(seq)
    >>> close_transformers(seq), type(seq[0]).__name__
    (['0'], 'TransformerEncoderLayer')
    """
    return _swap_classes(root, _CLOSED, names)
