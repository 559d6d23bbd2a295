"""``accelerate(model, example_inputs)``: swap layers of a finalized model for faster sparse
implementations, layer by layer, and check the result against the model it came from.

* conv -> position mask [-> BatchNorm] (semi-structured activation sparsity, mask before BN) in an
  fx graph becomes one :class:`PatchSkipConv2d` (BN folded, skipped positions hold the folded bias);
* Linear and 1x1 Conv2d layers whose weight is at least ``min_sparsity`` zeros become
  :class:`SparseLinear` / :class:`SparseConv1x1` (CSR, or BSR when the zeros come in blocks);
* each replacement is kept only if it is faster on the layer's real input shape (``decide``);
  everything else stays as it was. The :class:`AccelerationReport` lists every candidate layer.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from passes import set_submodule

from .patch_conv import PatchSkipConv2d, supports_patch_skip
from .select import AccelerationReport, LayerPath, choose
from .sparse_linear import SparseConv1x1, SparseLinear, supports_sparse_linear

__all__ = ["accelerate", "keep_mask_of", "AccelerationError", "BSR_BLOCKS"]

BSR_BLOCKS = (32, 16, 8)  # block sizes tried, largest first, when the zeros come in blocks
_MAX_BLOCK_DENSITY = 0.35  # a BSR layout storing more than this fraction of blocks is not tried


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
    """Input shape of every Conv2d / Linear call in one forward."""
    shapes, hooks = {}, []

    def hook(name):
        def record(mod, args):  # must return None: a pre-hook's return value replaces the inputs
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, args[0].shape)
        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _qual(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":  # in place or not: the conv output has no other reader
        return node.target in (torch.relu, torch.relu_, torch.nn.functional.relu)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _patch_skip_pass(model, shapes, decide, margin, rows, done):
    for prefix, gm in list(model.named_modules()):
        if not isinstance(gm, fx.GraphModule):
            continue
        changed = False
        erased: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node in erased:
                continue
            conv = gm.get_submodule(node.target)
            if not isinstance(conv, nn.Conv2d):
                continue
            mask_node = _only_user(node)
            if mask_node is None or mask_node.op != "call_module" or mask_node.args[0] is not node:
                continue
            mask_mod = gm.get_submodule(mask_node.target)
            keep = keep_mask_of(mask_mod)
            if keep is None:
                continue
            name = _qual(prefix, str(node.target))
            kind = f"Conv2d {conv.kernel_size[0]}x{conv.kernel_size[1]}"
            skipped = 1.0 - float(keep.float().mean())
            why = supports_patch_skip(conv)
            if why is None and name not in shapes:
                why = "never called on the example inputs"
            if why:
                rows.append(LayerPath(name, kind, "dense", why, skipped))
                done.add(name)
                continue
            bn_node = _only_user(mask_node)
            bn = gm.get_submodule(bn_node.target) if bn_node is not None and bn_node.op == "call_module" else None
            if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and not bn.training
                    and bn_node.args[0] is mask_node):
                bn, bn_node = None, None
            x = torch.randn(shapes[name]).contiguous(memory_format=torch.channels_last)
            fast = PatchSkipConv2d.from_conv(conv, keep, bn, input_hw=tuple(shapes[name][-2:]))
            chain = [m for m in (conv, mask_mod, bn) if m is not None]
            dense_cl = copy.deepcopy(nn.Sequential(*chain)).to(memory_format=torch.channels_last)
            path, times, reason = choose({"dense": lambda: dense_cl(x), "patch-skip": lambda: fast(x)},
                                         decide, margin)
            rows.append(LayerPath(name, kind, path, reason + ("" if bn is None or path == "dense" else "; BN folded"),
                                  skipped, times))
            done.add(name)
            if path == "dense":
                continue
            set_submodule(gm, str(node.target), fast)
            last = bn_node if bn_node is not None else mask_node
            last.replace_all_uses_with(node)
            for dead in ([bn_node] if bn_node is not None else []) + [mask_node]:
                gm.graph.erase_node(dead)
                gm.delete_submodule(str(dead.target))
                erased.add(dead)
            relu_node = _only_user(node)
            if relu_node is not None and _is_relu(gm, relu_node) and relu_node.args[0] is node:
                fast.relu = True  # fused into the GEMM; skipped positions hold relu(value)
                relu_node.replace_all_uses_with(node)
                gm.graph.erase_node(relu_node)  # the ReLU module may serve other nodes: keep it
                erased.add(relu_node)
                rows[-1].reason += "; ReLU fused"
            changed = True
        if changed:
            gm.graph.lint()
            gm.recompile()


def _bsr_block(weight2d: torch.Tensor) -> int | None:
    """The largest block size in :data:`BSR_BLOCKS` tiling the weight whose non-zero blocks are
    at most ``_MAX_BLOCK_DENSITY`` of all blocks, else None."""
    o, i = weight2d.shape
    nz = weight2d != 0
    for b in BSR_BLOCKS:
        if o % b or i % b:
            continue
        blocks = nz.reshape(o // b, b, i // b, b).any(3).any(1)
        if float(blocks.float().mean()) <= _MAX_BLOCK_DENSITY:
            return b
    return None


def _sparse_linear_pass(model, shapes, decide, margin, min_sparsity, rows, done):
    for name, m in list(model.named_modules()):
        if name in done or not isinstance(m, (nn.Linear, nn.Conv2d)) or type(m) not in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(m, nn.Conv2d) and supports_sparse_linear(m) is not None:
            continue  # k x k convs without a position mask: dense, not listed (nothing to decide)
        kind = "Linear" if isinstance(m, nn.Linear) else "Conv2d 1x1"
        w2 = m.weight.detach().reshape(m.weight.shape[0], -1)
        sparsity = float((w2 == 0).float().mean())
        if sparsity < min_sparsity:
            rows.append(LayerPath(name, kind, "dense", f"weight sparsity below {100 * min_sparsity:.0f}%", sparsity))
            continue
        if name not in shapes:
            rows.append(LayerPath(name, kind, "dense", "never called on the example inputs", sparsity))
            continue
        cls = SparseLinear if isinstance(m, nn.Linear) else SparseConv1x1
        make = (lambda layout, b=None: SparseLinear.from_linear(m, layout, b)) if cls is SparseLinear else \
            (lambda layout, b=None: SparseConv1x1.from_conv(m, layout, b))
        options = {"csr": make("csr")}
        b = _bsr_block(w2)
        if b is not None:
            options[f"bsr{b}"] = make("bsr", b)
        x = torch.randn(shapes[name])
        if isinstance(m, nn.Conv2d):
            x = x.contiguous(memory_format=torch.channels_last)
        cands = {"dense": lambda: m(x), **{k: (lambda mod=v: mod(x)) for k, v in options.items()}}
        path, times, reason = choose(cands, decide, margin)
        rows.append(LayerPath(name, kind, path, reason, sparsity, times))
        if path != "dense":
            set_submodule(model, name, options[path])


@torch.no_grad()
def accelerate(model: nn.Module, example_inputs, *, decide: str = "measure", min_sparsity: float = 0.8,
               margin: float = 0.05, channels_last: bool | None = None, check: bool = True,
               rtol: float = 1e-4, atol: float = 1e-5) -> nn.Module:
    """A copy of the finalized ``model`` with faster sparse layers where they pay (CPU, float32).

    ``example_inputs`` (a tensor or tuple) fix the shapes layers are timed and built for (a
    patch-skipping conv serves one input resolution). ``decide`` is ``"measure"`` (time each
    candidate on this machine, keep what beats dense by ``margin``), ``"always"`` or ``"never"``.
    ``channels_last`` (default: when any patch-skipping conv was chosen) stores the remaining conv
    weights channels-last so the whole network runs in the layout the patch-skipping convs produce.
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
    from ..finalize import outputs_close

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    model.eval()
    out = copy.deepcopy(model).eval()
    shapes = _record_inputs(out, inputs)
    rows: list[LayerPath] = []
    done: set[str] = set()
    _patch_skip_pass(out, shapes, decide, margin, rows, done)
    _sparse_linear_pass(out, shapes, decide, margin, min_sparsity, rows, done)
    if channels_last is None:
        channels_last = any(r.path == "patch-skip" for r in rows)
    if channels_last:
        for m in out.modules():
            if type(m) is nn.Conv2d:
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    report = AccelerationReport(rows, decide, [list(x.shape) for x in inputs if hasattr(x, "shape")])
    out.acceleration = report
    if check:
        ok, worst = outputs_close(model(*inputs), out(*inputs), rtol, atol)
        if not ok:
            raise AccelerationError(f"the accelerated model's output differs from the finalized model's "
                                    f"(largest relative difference {worst:.3g}; rtol={rtol}, atol={atol})\n{report}")
    return out
