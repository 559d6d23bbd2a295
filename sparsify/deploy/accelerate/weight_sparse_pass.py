"""The pass for weight-sparse layers: each Linear and Conv2d whose weight is sparse enough is timed
as CSR or BSR (:class:`SparseLinear` / :class:`SparseConv1x1`, CSR also in row blocks) and, for a
conv, as a :class:`DirectSparseConv2d`, and the fastest kept. Kept out of convert.py, which runs
the passes in order and checks the result (the pool and fusion passes live apart too): this one
walks modules, not fx graphs, and owns its block sizes and row blocks."""
from __future__ import annotations

import torch
from torch import nn

from passes import set_submodule

from sparsify.deploy.accelerate.direct_conv import DirectSparseConv2d, direct_available, supports_direct
from sparsify.deploy.accelerate.select import LayerPath, choose
from sparsify.deploy.accelerate.sparse_linear import SparseConv1x1, SparseLinear, supports_sparse_linear

BSR_BLOCKS = (32, 16, 8)  # block sizes tried, largest first, when the zeros come in blocks
_MAX_BLOCK_DENSITY = 0.35  # a BSR layout storing more than this fraction of blocks is not tried
# CSR layers are also timed taking the input this many rows at a time (SparseLinear.token_block):
# at 1576 rows (vit_b_16, batch 8) whole-input calls leave the cache and run 1.5-3x slower.
TOKEN_BLOCKS = (128, 32)


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


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "Linear"
    return f"Conv2d {m.kernel_size[0]}x{m.kernel_size[1]}" + (f" g{m.groups}" if m.groups > 1 else "")


def _sparse_linear_pass(model, shapes, decide, margin, min_sparsity, rows, done, min_conv_sparsity=1.0):
    for name, m in list(model.named_modules()):
        if name in done or not isinstance(m, (nn.Linear, nn.Conv2d)) or type(m) not in (nn.Linear, nn.Conv2d):
            continue
        is_conv = isinstance(m, nn.Conv2d)
        csr_ok = supports_sparse_linear(m) is None
        direct_ok = is_conv and supports_direct(m) is None
        if not csr_ok and not direct_ok:
            continue  # e.g. a conv with padding='same': dense, not listed (nothing to decide)
        kind = _kind(m)
        w2 = m.weight.detach().reshape(m.weight.shape[0], -1)
        sparsity = float((w2 == 0).float().mean())
        csr_ok = csr_ok and sparsity >= min_sparsity
        direct_ok = direct_ok and sparsity >= min_conv_sparsity
        if not csr_ok and not direct_ok:
            floor = min(min_sparsity if supports_sparse_linear(m) is None else 1.0,
                        min_conv_sparsity if is_conv else 1.0)
            if floor < 1.0:  # listed only where some sparse path could apply at a higher sparsity
                rows.append(LayerPath(name, kind, "dense", f"weight sparsity below {100 * floor:.0f}%", sparsity))
            continue
        if name not in shapes:
            rows.append(LayerPath(name, kind, "dense", "never called on the example inputs", sparsity))
            continue
        unavailable = direct_available() if direct_ok else None
        if unavailable:
            direct_ok = False
            if not csr_ok:
                rows.append(LayerPath(name, kind, "dense", unavailable, sparsity))
                continue
        options = {}
        x = torch.randn(shapes[name])
        if direct_ok:  # the network runs in NCHW unless patch-skipping convs turned it channels-last
            direct = DirectSparseConv2d.from_conv(m)  # "direct-b4": with groups of 4 output channels
            options["direct" + (f"-b{direct.block_size()}" if direct.block_size() > 1 else "")] = direct
        elif is_conv:
            x = x.contiguous(memory_format=torch.channels_last)
        if csr_ok:
            cls = SparseLinear if isinstance(m, nn.Linear) else SparseConv1x1
            make = (lambda layout, b=None: SparseLinear.from_linear(m, layout, b)) if cls is SparseLinear else \
                (lambda layout, b=None: SparseConv1x1.from_conv(m, layout, b))
            options["csr"] = make("csr")
            if is_conv:
                n_rows = x.shape[0] * len(range(0, x.shape[2], m.stride[0])) * len(range(0, x.shape[3], m.stride[1]))
            else:
                n_rows = x.numel() // x.shape[-1]
            for tb in TOKEN_BLOCKS:  # the same CSR matrix, the input taken in row blocks
                if n_rows > 2 * tb:
                    options[f"csr/{tb}"] = make("csr")
                    options[f"csr/{tb}"].token_block = tb
            b = _bsr_block(w2)
            if b is not None:
                options[f"bsr{b}"] = make("bsr", b)
        cands = {"dense": lambda: m(x), **{k: (lambda mod=v: mod(x)) for k, v in options.items()}}
        path, times, reason = choose(cands, decide, margin)
        if "/" in path:
            reason += f"; {path.split('/')[1]} input rows per sparse call"
        if path.startswith("direct-b"):
            reason += f"; {100 * options[path].blocked_fraction():.0f}% of its taps in output channel blocks"
        rows.append(LayerPath(name, kind, path.split("/")[0], reason, sparsity, times))
        if path != "dense":
            set_submodule(model, name, options[path])
