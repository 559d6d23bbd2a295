"""``accelerate(model, example_inputs)``: swap layers of a finalized model for faster sparse
implementations, layer by layer, and check the result against the model it came from.

* conv -> position mask [-> BatchNorm] (semi-structured activation sparsity, mask before BN) in an
  fx graph becomes one :class:`PatchSkipConv2d` (BN folded, skipped positions hold the folded bias);
* Linear and 1x1 Conv2d layers whose weight is at least ``min_sparsity`` zeros become
  :class:`SparseLinear` / :class:`SparseConv1x1` (CSR, or BSR when the zeros come in blocks);
* Conv2d layers (any kernel, stride, dilation, groups) whose weight is at least
  ``min_conv_sparsity`` zeros may become :class:`DirectSparseConv2d` (a compiled direct sparse
  convolution), with a ReLU that only reads its output fused in; path ``direct-b4`` (``-b2``) where
  groups of 4 (2) output channels share their non-zero positions (``block=[4, 1]`` pruning);
* each replacement is kept only if it is faster on the layer's real input shape (``decide``);
  everything else stays dense, with eval BatchNorms that follow a conv folded into it
  (``fold_bn``; a masked conv that stays dense then fills its skipped positions with ``BN(0)``,
  :class:`PositionFill`). The :class:`AccelerationReport` lists every candidate layer, and every
  finalized SAS layer (dense: no sparse kernel runs its wide conv over the slots).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from passes import replace_uses, set_submodule
from passes.call_inputs import positional_inputs

from sparsify.core.modes import kept_modes
from sparsify.deploy.accelerate.fuse import fuse_relu_pass, fuse_residual_pass
from sparsify.deploy.accelerate.graph_edits import erase, is_relu, only_user, qual, rewrite_graphs
from sparsify.deploy.accelerate.fold import PositionFill, foldable_bn, folded_conv
from sparsify.deploy.accelerate.patch_conv import PatchSkipConv2d, supports_patch_skip
from sparsify.deploy.accelerate.pool import channels_last_pool_pass
from sparsify.deploy.accelerate.select import AccelerationReport, LayerPath, choose
from sparsify.deploy.accelerate.weight_sparse_pass import BSR_BLOCKS, _sparse_linear_pass

__all__ = ["accelerate", "keep_mask_of", "AccelerationError", "BSR_BLOCKS"]


class AccelerationError(RuntimeError):
    """The accelerated model does not compute what the model it came from computes."""


def keep_mask_of(module: nn.Module) -> torch.Tensor | None:
    """The (H, W) bool kept-output-position mask of a semi-structured mask module, else None.

    A module qualifies by a ``keep_positions()`` method returning that mask, or by being a
    ``*PositionMask`` class whose 2-D ``mask`` buffer multiplies its input (``y = x * mask``).

    >>> keep_mask_of(torch.nn.ReLU()) is None
    True
    """
    fn = getattr(module, "keep_positions", None)
    if callable(fn):
        keep = fn()
        return None if keep is None else keep.bool()
    if type(module).__name__.endswith("PositionMask"):
        m = getattr(module, "mask", None)
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m != 0
    return None


def _record_inputs(model: nn.Module, inputs: tuple) -> dict[str, torch.Size]:
    """Input shape of every Conv2d / Linear / MaxPool2d call in one forward."""
    shapes, hooks = {}, []

    def hook(name):
        def record(mod, args):  # must return None: a pre-hook's return value replaces the inputs
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, args[0].shape)
        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d)):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _patch_skip_pass(model, shapes, decide, margin, rows, done, fold=True):
    def rewrite(prefix, gm, node, erased) -> bool:
        conv = gm.get_submodule(node.target)
        if not isinstance(conv, nn.Conv2d):
            return False
        mask_node = only_user(node)
        if mask_node is None or mask_node.op != "call_module" or mask_node.args[0] is not node:
            return False
        mask_mod = gm.get_submodule(mask_node.target)
        keep = keep_mask_of(mask_mod)
        if keep is None:
            return False
        name = qual(prefix, str(node.target))
        kind = f"Conv2d {conv.kernel_size[0]}x{conv.kernel_size[1]}"
        skipped = 1.0 - float(keep.float().mean())
        why = supports_patch_skip(conv)
        if why is None and name not in shapes:
            why = "never called on the example inputs"
        if why:
            rows.append(LayerPath(name, kind, "dense", why, skipped))
            done.add(name)
            return False
        bn_node = only_user(mask_node)
        bn = gm.get_submodule(bn_node.target) if bn_node is not None and bn_node.op == "call_module" else None
        if not (foldable_bn(bn) and bn_node.args[0] is mask_node):
            bn, bn_node = None, None
        last = bn_node if bn_node is not None else mask_node
        relu_node = only_user(last)
        if relu_node is None or not is_relu(gm, relu_node) or relu_node.args[0] is not last:
            relu_node = None
        x = torch.randn(shapes[name]).contiguous(memory_format=torch.channels_last)
        fast = PatchSkipConv2d.from_conv(conv, keep, bn, input_hw=tuple(shapes[name][-2:]))
        fast.relu = relu_node is not None  # fused into the GEMM; skipped positions hold relu(value)
        if bn is not None and fold:  # the dense alternative folds BN too: compare like with like
            dense_chain = [folded_conv(conv, bn), PositionFill(keep, fast.skip_value)]
        else:
            dense_chain = [copy.deepcopy(m) for m in (conv, mask_mod, bn) if m is not None]
        relu = [nn.ReLU(inplace=True)] if relu_node is not None else []
        dense = nn.Sequential(*dense_chain, *relu).to(memory_format=torch.channels_last)
        path, times, reason = choose({"dense": lambda: dense(x), "patch-skip": lambda: fast(x)},
                                     decide, margin)
        folded = bn is not None and (path != "dense" or fold)
        rows.append(LayerPath(name, kind, path, reason + ("; BN folded" if folded else "")
                              + ("; ReLU fused" if path != "dense" and relu_node is not None else ""),
                              skipped, times))
        done.add(name)
        if path == "dense":
            if bn is not None and fold:  # conv(folded) -> fill skipped positions with BN(0)
                set_submodule(gm, str(node.target), dense_chain[0])
                set_submodule(gm, str(mask_node.target), dense_chain[1])
                erase(gm, bn_node, erased, mask_node)
                return True
            return False
        set_submodule(gm, str(node.target), fast)
        replace_uses(last, node)
        for dead in ([bn_node] if bn_node is not None else []) + [mask_node]:
            erase(gm, dead, erased)
        if relu_node is not None:
            erase(gm, relu_node, erased, node, keep_module=True)  # the ReLU module may serve other nodes
        return True

    rewrite_graphs(model, rewrite)


def _fold_bn_pass(model) -> int:
    """Fold every eval BatchNorm2d that is the only reader of a plain Conv2d's output (fx graphs
    only); returns how many were folded. Masked convs were handled by the patch-skip pass."""
    folded = 0

    def rewrite(_prefix, gm, node, erased) -> bool:
        nonlocal folded
        if type(gm.get_submodule(node.target)) is not nn.Conv2d:
            return False
        bn_node = only_user(node)
        if bn_node is None or bn_node.op != "call_module" or bn_node.args[0] is not node:
            return False
        bn = gm.get_submodule(bn_node.target)
        if not foldable_bn(bn) or sum(n.target == node.target for n in gm.graph.nodes if n.op == "call_module") > 1:
            return False  # a conv module called from two places may feed something else there
        set_submodule(gm, str(node.target), folded_conv(gm.get_submodule(node.target), bn))
        erase(gm, bn_node, erased, node)
        folded += 1
        return True

    rewrite_graphs(model, rewrite)
    return folded


def _sas_rows(model: nn.Module, rows: list[LayerPath]) -> None:
    """A dense row for each finalized SAS layer (a graph, no Conv/Linear module: no pass sees it)."""
    for name, m in model.named_modules():
        if (slots := getattr(m, "sas_m", None)) is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        w = m.weight.detach()
        kind = "Linear" if w.dim() == 2 else f"Conv{w.dim() - 2}d " + "x".join(map(str, w.shape[2:]))
        rows.append(LayerPath(name, f"SAS {kind}", "dense", f"SAS layer: one {slots}x-wide "
                              f"{'linear' if w.dim() == 2 else 'conv'} over the input's slots (no sparse kernel)",
                              float((w == 0).float().mean())))


@torch.no_grad()
def accelerate(model: nn.Module, example_inputs, *, decide: str = "measure", min_sparsity: float = 0.8,
               min_conv_sparsity: float = 0.5, margin: float = 0.05, channels_last: bool | None = None, fold_bn: bool = True, check: bool = True,
               rtol: float = 1e-4, atol: float = 1e-5) -> nn.Module:
    """A copy of the finalized ``model`` with faster sparse layers where they pay (CPU, float32).

    ``example_inputs`` (a tensor or tuple) fix the shapes layers are timed and built for (a
    patch-skipping conv serves one input resolution). ``decide`` is ``"measure"`` (time each
    candidate on this machine, keep what beats dense by ``margin``), ``"always"`` or ``"never"``.
    ``channels_last`` (default: when any patch-skipping conv was chosen) stores the remaining conv
    weights channels-last so the whole network runs in the layout the patch-skipping convs produce.
    ``min_conv_sparsity``: a Conv2d with at least this fraction of zero weights is also timed as a
    :class:`DirectSparseConv2d` (built on first use; dense with one warning where it cannot be).
    ``fold_bn`` folds every eval BatchNorm that directly follows a conv (masked or not) into it, so
    the layers that stay dense cost what they cost in the strongest dense deployment.
    The result's ``acceleration`` attribute is the :class:`AccelerationReport`; with ``check`` its
    output is compared with ``model``'s (``rtol`` / ``atol`` relative to the output's largest
    magnitude, as in ``finalize``) and an ``AccelerationError`` raised if they differ.

    >>> import torch, sparsify
    >>> lin = torch.nn.Sequential(torch.nn.Linear(64, 64))
    >>> with torch.no_grad(): lin[0].weight[:, :60] = 0
    >>> fast = accelerate(lin, torch.randn(2, 64), decide="always")
    >>> fast.acceleration.path_of("0")
    'csr'
    """
    from sparsify.deploy.compare import outputs_close

    example_inputs = positional_inputs(model, example_inputs)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    elsewhere = sorted({str(t.device) for t in (*model.parameters(), *model.buffers(), *inputs)
                        if isinstance(t, torch.Tensor) and t.device.type != "cpu"})
    if elsewhere:  # candidates are built and timed on CPU tensors: a GPU model would fail deep inside
        raise ValueError(f"accelerate() builds CPU inference layers, but the model or its example inputs are on "
                         f"{', '.join(elsewhere)}: call it on model.cpu() with CPU inputs")
    out = copy.deepcopy(model).eval()
    shapes = _record_inputs(out, inputs)
    rows: list[LayerPath] = []
    done: set[str] = set()
    _patch_skip_pass(out, shapes, decide, margin, rows, done, fold=fold_bn)
    folded = _fold_bn_pass(out) if fold_bn else 0
    _sparse_linear_pass(out, shapes, decide, margin, min_sparsity, rows, done, min_conv_sparsity)
    _sas_rows(out, rows)
    fuse_residual_pass(out, rows)
    fuse_relu_pass(out, rows)
    if channels_last is None:
        channels_last = any(r.path == "patch-skip" for r in rows)
    if channels_last:
        for m in out.modules():
            if type(m) is nn.Conv2d:
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    else:  # an NCHW network: its max pools may run faster channels-last
        channels_last_pool_pass(out, shapes, decide, margin, rows)
    report = AccelerationReport(rows, decide, [list(x.shape) for x in inputs if hasattr(x, "shape")], folded)
    out.acceleration = report
    if check:
        with kept_modes(model, training=False), torch.no_grad():  # the caller's model keeps its mode
            ok, worst = outputs_close(model(*inputs), out(*inputs), rtol, atol)
        if not ok:
            raise AccelerationError(f"the accelerated model's output differs from the finalized model's "
                                    f"(largest relative difference {worst:.3g}; rtol={rtol}, atol={atol})\n{report}")
    return out
