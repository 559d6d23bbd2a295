"""torch's inference fast paths, which read weights as stored, and the feed-forward layers of
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``.

In eval under ``no_grad``, ``nn.TransformerEncoderLayer`` runs ``torch._transformer_encoder_layer_fwd``
with ``self_attn``'s and ``linear1`` / ``linear2``'s weights as stored: a sparse layer's effective
weight is not what is stored. torch takes the regular path when a module inside the layer has
hooks, so a sparsified layer carries :func:`no_fast_path`, a pre-hook that does nothing.

``nn.TransformerEncoder`` has a fast path of its own: in eval under ``no_grad``, given a padding
mask, it turns the batch into a nested tensor, which the regular path of a layer cannot take
("Nested tensor dimension 0 cannot be transposed"), and gives the padded positions back as zeros.
An encoder with sparse parts runs its layers on padded tensors and zeroes those positions itself
where torch would have gone nested (:func:`off_nested_path`, with the encoder of
:mod:`sparsify.prepare.open_transformer`); ``finalize`` gives it torch's class back.

These torch layers are leaves of a trace (their code is never traced), but their regular forward
calls ``linear1`` and ``linear2`` as modules: those are rewritten as attributes, like the layers
inside an untraceable module (:func:`ffn_candidates`), and the layer is put back in place with the
pre-hook (:func:`off_fast_path`). ``finalize`` removes the hooks (:func:`drop_fast_path_hooks`):
the deployed weights are in the tensors, and the fast path is right again.

>>> import torch, sparsify
>>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
>>> m = sparsify.sparsify(enc, "gmp", total_steps=10, example_inputs=torch.zeros(1, 4, 16))
>>> type(m.layers[0]).__name__, type(m.layers[0].linear1).__name__
('TransformerEncoderLayer', 'MagnitudeLinear')
"""
from __future__ import annotations

from torch import nn

from passes.hooks import remove_hooks
from passes.rewrite import recast

from sparsify.prepare.matching import Candidate
from sparsify.prepare.open_transformer import open_transformers

__all__ = ["no_fast_path", "TRANSFORMER_LAYERS", "ffn_candidates", "off_fast_path", "off_nested_path",
           "drop_fast_path_hooks"]

#: torch's transformer layers whose forward calls its feed-forward ``linear1`` and ``linear2``
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_FFN = ("linear1", "linear2")


def no_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: a torch transformer layer with a hooked module inside
    skips its inference fast path, which would read the stored (dense) weights."""
    return None


def ffn_candidates(root: nn.Module, winner) -> tuple[list[Candidate], list[tuple[str, nn.Module]]]:
    """Candidates for the ``linear1`` / ``linear2`` of every torch transformer layer of ``root`` a
    rule reaches, and for each such layer the swap (qualified name, the layer off its fast path)
    that :func:`~sparsify.prepare.hidden.convert_hidden` applies; nothing is changed here.

    >>> from types import SimpleNamespace
    >>> model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32))
    >>> cands, swaps = ffn_candidates(model, lambda c: SimpleNamespace(method="gmp"))  # every rule rewrites
    >>> [c.name for c in cands], [(name, swaps[0][1] is model[0]) for name, _ in swaps]
    (['0.linear1', '0.linear2'], [('0', False)])
    >>> ffn_candidates(model, lambda c: None)  # no rule reaches them
    ([], [])
    """
    out, swaps = [], []
    for name, layer in root.named_modules():
        if type(layer) not in TRANSFORMER_LAYERS:  # a subclass with its own forward is traced as usual
            continue
        q = (lambda s: f"{name}.{s}" if name else s)  # noqa: E731
        cands = [Candidate(q(a), layer._modules[a]) for a in _FFN if type(layer._modules.get(a)) is nn.Linear]
        if any((w := winner(c)) is not None and w.method is not None for c in cands):
            out.extend(cands)
            swaps.append((name, off_fast_path(layer)))
    return out, swaps


def off_fast_path(layer: nn.Module) -> nn.Module:
    """A module of ``layer``'s class holding its children, parameters and attributes (the same
    tensors and child modules), with :func:`no_fast_path` as a forward pre-hook: put in ``layer``'s
    place, it computes what ``layer`` does, on the regular path.

    >>> layer = nn.TransformerEncoderLayer(16, 2, 32)
    >>> new = off_fast_path(layer)
    >>> type(new) is type(layer), new.linear1 is layer.linear1, len(layer._forward_pre_hooks)
    (True, True, 0)
    """
    new = recast(layer, type(layer), ("_parameters", "_buffers", "_modules", "_forward_pre_hooks"))
    if no_fast_path not in new._forward_pre_hooks.values():
        new.register_forward_pre_hook(no_fast_path)
    return new


def off_nested_path(root: nn.Module, rewritten: list[str]) -> list[str]:
    """Give every ``nn.TransformerEncoder`` of ``root`` that holds one of the modules named in
    ``rewritten`` the class that runs its layers on padded tensors and leaves the padded positions
    as torch's nested path does (:class:`~sparsify.prepare.open_transformer.OpenTransformerEncoder`);
    returns their names. ``root`` is the model being rewritten.

    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    >>> off_nested_path(enc, ["layers.0.linear1"]), type(enc).__name__, enc.use_nested_tensor
    ([''], 'OpenTransformerEncoder', True)
    """
    names = [name for name, m in root.named_modules() if type(m) is nn.TransformerEncoder
             and m.__dict__.get("use_nested_tensor") and any(r.startswith(f"{name}." if name else "") for r in rewritten)]
    open_transformers(root, names)
    return names


def drop_fast_path_hooks(root: nn.Module) -> None:
    """Remove :func:`no_fast_path` from every module of ``root``, and give encoders their nested
    path back (``finalize``: the weights are deployed into the tensors, so torch's fast paths
    compute the same again).

    >>> layer = off_fast_path(nn.TransformerEncoderLayer(16, 2, 32)); drop_fast_path_hooks(layer)
    >>> len(layer._forward_pre_hooks)
    0
    """
    for m in root.modules():
        remove_hooks(m, "_forward_pre_hooks", no_fast_path)
        if "_dense_use_nested_tensor" in m.__dict__:  # sparse models pickled before open_transformer.py
            m.use_nested_tensor = m.__dict__.pop("_dense_use_nested_tensor")
