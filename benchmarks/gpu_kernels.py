"""2:4 sparse tensor core measurements of ``make gpu-check`` (benchmarks/gpu_check.py):

* N:M 2:4 inference: ViT-B/16's MLP blocks (Linear 768->3072, GELU, Linear 3072->768) with 2:4
  weights, dense vs ``sparsify.deploy.semistructured24`` (torch's semi-structured sparse
  tensors) in bf16, batch 256 x 197 tokens; outputs compared;
* SAS as 2:4: a SAS layer's slot tensor has one non-zero in every pair of slots along the reduction
  dimension (M = 2 sign slots), so at most 2 of every 4 values are non-zero. Three ways to run one
  layer, as GEMMs (convs as im2col GEMMs, the reduction dimension ordered (kh, kw, C, slot) so
  the two slots of an input are neighbours; reordering K in both operands changes no result):
  the official layout (slots interleaved into a 2x wide dense input, one wide dense GEMM), the
  slot tensor compressed to torch's semi-structured form (the sparse operand of the GEMM; timed
  with and without the compression, which a real layer pays every step), and the narrow dense
  layer the SAS layer replaced.

Each function takes ``device``, ``dtype`` and a ``tiny`` flag (CPU dry run: small shapes, the
2:4 kernels skipped with the reason recorded, since torch runs them on CUDA only).
"""
from __future__ import annotations

import time

import torch
from torch import nn


def timed(fn, device, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2]


def _two_four(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the 2 largest |w| of every 4 consecutive inputs kept (the nm-2-4 mask)."""
    from sparsify.methods.nm import nm_mask
    return w * nm_mask(w.float(), 2, 4).to(w.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def nm_vit_mlp(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    """Dense vs semi-structured 2:4 ViT-B/16 MLP blocks (12 of them), batch 256 x 197 tokens."""
    from sparsify.deploy.semistructured24 import semi_structured_available, to_semi_structured
    hidden, mlp, tokens, blocks = (64, 256, 256, 2) if tiny else (768, 3072, 256 * 197, 12)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Linear(mlp, hidden))
                            for _ in range(blocks)]).to(device, dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_two_four(m.weight))
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    out = {"shape": f"{blocks} blocks, Linear {hidden}->{mlp}->{hidden}, {tokens} tokens", "dtype": str(dtype)}
    with torch.no_grad():
        out["dense_ms"] = timed(lambda: model(x), device, reps=20 if device.type == "cuda" else 2) * 1e3
        ok, why = semi_structured_available(device)
        if not ok:
            out["skipped"] = why
            return out
        sparse = to_semi_structured(model)
        out["sparse_ms"] = timed(lambda: sparse(x), device) * 1e3
        out["speedup"] = out["dense_ms"] / out["sparse_ms"]
        out["rel_error"] = _rel(sparse(x), model(x))
        out["converted"] = sum(1 for p in sparse.semi_structured.values() if p == "2:4")
    return out


# (name, positions per image, input channels, output channels, kernel positions); batch 32
RESNET18_LAYERS = [("layer1 3x3", 56 * 56, 64, 64, 9), ("layer2 3x3", 28 * 28, 128, 128, 9),
                   ("layer3 3x3", 14 * 14, 256, 256, 9), ("layer4 3x3", 7 * 7, 512, 512, 9)]


def _sas_case(name: str, rows: int, cin: int, cout: int, taps: int, device, dtype) -> dict:
    """One SAS layer as a GEMM three ways; see the module docstring."""
    from torch.sparse import to_sparse_semi_structured
    torch.manual_seed(0)
    x = torch.randn(rows, taps * cin, device=device, dtype=dtype)  # im2col rows, K = (taps, C)
    w_wide = torch.randn(cout, taps * cin * 2, device=device, dtype=dtype) / (taps * cin) ** 0.5
    w_narrow = w_wide[:, 0::2].contiguous()  # slot 0's weights: the dense layer on relu(x)

    def slots():  # (relu(x), relu(x) - x) interleaved: one non-zero per pair
        s = torch.empty(rows, taps * cin, 2, device=device, dtype=dtype)
        torch.relu(x, out=s[..., 0])
        torch.sub(s[..., 0], x, out=s[..., 1])
        return s.view(rows, -1)

    wide_t = w_wide.t().contiguous()
    out = {"layer": name, "gemm": f"{rows} x {2 * taps * cin} -> {cout}"}
    ref = slots() @ wide_t
    out["official_ms"] = timed(lambda: slots() @ wide_t, device) * 1e3
    out["narrow_dense_ms"] = timed(lambda: torch.relu(x) @ w_narrow.t(), device) * 1e3
    packed = to_sparse_semi_structured(slots())
    out["sparse_gemm_ms"] = timed(lambda: torch.mm(packed, wide_t), device) * 1e3
    out["sparse_with_compress_ms"] = timed(lambda: torch.mm(to_sparse_semi_structured(slots()), wide_t), device) * 1e3
    out["rel_error"] = _rel(torch.mm(packed, wide_t), ref)
    out["speedup_vs_official"] = out["official_ms"] / out["sparse_with_compress_ms"]
    out["speedup_vs_official_gemm_only"] = out["official_ms"] / out["sparse_gemm_ms"]
    return out


def sas_two_four(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    """SAS layers (M = 2) on ResNet-18's 3x3 conv shapes at batch 32 and a transformer MLP's second
    Linear (3072 -> 768, 197 x 64 tokens), official layout vs 2:4 sparse operand vs narrow dense."""
    from sparsify.deploy.semistructured24 import semi_structured_available
    ok, why = semi_structured_available(device)
    if not ok:
        return {"skipped": why}
    batch = 32
    cases = [(n, batch * p, ci, co, t) for n, p, ci, co, t in RESNET18_LAYERS]
    cases.append(("transformer MLP fc2", 197 * 64, 3072, 768, 1))
    if tiny:
        cases = [(n, 128, 64, 64, 1) for n, *_ in cases[:1]]
    return {"cases": [_sas_case(*c, device, dtype) for c in cases], "dtype": str(dtype)}


def plain_linear_speed(device: torch.device, dtype: torch.dtype) -> float:
    """Reference: one 8192^3 dense GEMM's TFLOP/s (what the hardware gives dense work here)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ a, device, reps=5)
    return 2 * n ** 3 / t / 1e12
