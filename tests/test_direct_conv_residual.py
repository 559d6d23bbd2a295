"""Residual connections fused into the direct sparse conv (sparsify.deploy.accelerate.fuse):
``relu(conv(x) + y)`` computed in the conv's own pass equals the unfused graph on every kernel
path (whole tiles, partial tiles, dropped columns), falls back to torch's add where the kernel
cannot take the residual, and the fx pass rewrites only the adds it may."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.deploy.accelerate import DirectSparseConv2d, accelerate
from sparsify.deploy.accelerate.fuse import add_operands
from sparsify.deploy.compare import outputs_close

from test_direct_conv import _close, _sparse_conv, _sparse_resnet


@settings(max_examples=30, deadline=None)
@given(cin=st.integers(1, 12), cout=st.integers(1, 12), k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
       padding=st.integers(0, 2), h=st.integers(5, 20), w=st.integers(5, 20), batch=st.sampled_from([1, 3]),
       sparsity=st.floats(0.0, 0.95), relu=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fused_residual_equals_conv_plus_residual(built, cin, cout, k, stride, padding, h, w, batch, sparsity,
                                                  relu, seed):
    if k > min(h, w) + 2 * padding:
        return  # no output position
    conv = _sparse_conv(cin, cout, k, stride, padding, 1, 1, sparsity, seed=seed)
    fast = DirectSparseConv2d.from_conv(conv, relu=relu)
    x = torch.randn(batch, cin, h, w)
    with torch.no_grad():
        ref = conv(x)
        y = torch.randn_like(ref)
        want = F.relu(ref + y) if relu else ref + y
        _close(fast(x, y), want)
        _close(fast(x, y.contiguous(memory_format=torch.channels_last)), want)
        # ReLU after the add, not before it: a negative sum must be zero, a positive one kept
        assert bool((fast(x, y) >= 0).all()) == relu or bool((want >= 0).all())


def test_residual_the_kernel_cannot_take_is_added_by_torch(built):
    conv = _sparse_conv(8, 6, 3, 1, 1, 1, 1, 0.8)
    fast = DirectSparseConv2d.from_conv(conv, relu=True)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = conv(x)
        for y in (torch.randn(1, 6, 1, 1), torch.randn(6, 1, 1), torch.randn(2, 6, 9, 9, dtype=torch.float64)):
            out = fast(x, y)
            assert out.dtype == (ref + y).dtype
            _close(out.float(), F.relu(ref + y).float())
        with pytest.raises(RuntimeError, match="residual"):  # the operator itself checks its input
            off, blocks, geometry = fast.plan(9, 9)
            torch.ops.sparsify_direct.conv2d(x, off, blocks, fast.values, fast.bias, geometry, False,
                                             torch.randn(2, 6, 8, 9))


def test_fused_residual_gives_the_same_bits_on_any_number_of_threads(built):
    conv = _sparse_conv(16, 32, 3, 1, 1, 1, 1, 0.8)
    fast = DirectSparseConv2d.from_conv(conv, relu=True)
    x, y = torch.randn(2, 16, 20, 20), torch.randn(2, 32, 20, 20)
    before, outs = torch.get_num_threads(), []
    try:
        with torch.no_grad():
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(fast(x, y))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_accelerate_fuses_every_residual_add_of_a_resnet(built):
    model = _sparse_resnet()
    x = torch.randn(2, 3, 64, 64)
    fast = accelerate(model, x, decide="always")
    adds = [n for n in fast.graph.nodes if add_operands(n) is not None]
    assert not adds  # all 8 of ResNet-18's `out += identity`, and the ReLUs after them
    assert not any(n.op == "call_module" and isinstance(fast.get_submodule(n.target), nn.ReLU)
                   for n in fast.graph.nodes)
    fused = [r.name for r in fast.acceleration.layers if "residual add fused" in r.reason]
    assert len(fused) == 8 and all(n.endswith("conv2") for n in fused)
    with torch.no_grad():
        for xb in (x, torch.randn(1, 3, 48, 40)):
            ok, worst = outputs_close(model(xb), fast(xb), rtol=1e-4, atol=1e-5)
            assert ok, worst


class _Adds(nn.Module):
    """A conv's output added three ways: in place into another tensor (must stay: it updates
    `y`, which is read again), in place into the conv's output, and with alpha (not a plain add)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (_sparse_conv(4, 4, 3, 1, 1, 1, 1, 0.7, seed=s) for s in (1, 2, 3))

    def forward(self, x):
        y = x * 2
        y.add_(self.a(x))
        z = self.b(x)
        z += y
        return torch.add(self.c(x), z, alpha=2.0) + y


def test_only_plain_adds_of_the_conv_output_are_fused(built):
    model = fx.symbolic_trace(_Adds().eval())
    x = torch.randn(1, 4, 8, 8)
    fast = accelerate(model, x, decide="always", min_conv_sparsity=0.5)
    fused = {r.name for r in fast.acceleration.layers if "residual add fused" in r.reason}
    assert fused == {"b"}
    assert any(n.target == operator.iadd or n.target == "add_" for n in fast.graph.nodes)  # y.add_ kept
    with torch.no_grad():
        _close(fast(x), model(x))  # y's in-place update is still seen by its later reader
