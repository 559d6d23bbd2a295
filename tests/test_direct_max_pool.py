"""The compiled NCHW max pool (sparsify.deploy.accelerate.pool.DirectMaxPool2d): the same values
as nn.MaxPool2d (padding as -inf, NaN propagated) on any kernel, stride and padding it accepts,
torch's pool where it cannot run, and refused with a reason for what it does not support."""
from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.deploy.accelerate.pool import DirectMaxPool2d



@settings(max_examples=60, deadline=None)
@given(kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       data=st.data(), h=st.integers(1, 20), w=st.integers(1, 20), batch=st.integers(1, 3),
       specials=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf")]), max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_direct_max_pool_equals_max_pool(built, kh, kw, sh, sw, data, h, w, batch, specials, seed):
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return  # no output position
    pool = nn.MaxPool2d((kh, kw), (sh, sw), (ph, pw))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, h, w, generator=g)
    for v in specials:  # a NaN anywhere in a window makes it NaN, as in torch
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = v
    got, want = DirectMaxPool2d.from_pool(pool)(x), pool(x)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_direct_max_pool_falls_back_to_torch_and_refuses_what_it_cannot_do(built):
    pool = nn.MaxPool2d(3, 2, 1)
    fast = DirectMaxPool2d.from_pool(pool)
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    fast(x).sum().backward()  # autograd: torch's pool
    assert x.grad is not None and torch.equal(fast(x.detach()[0]), pool(x.detach()[0]))  # 3-D input
    x64 = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    assert torch.equal(fast(x64), pool(x64))
    assert torch.equal(pickle.loads(pickle.dumps(fast))(x.detach()), pool(x.detach()))
    for bad, why in [(nn.MaxPool2d(2, return_indices=True), "indices"), (nn.MaxPool2d(3, dilation=2), "dilation"),
                     (nn.MaxPool2d(3, ceil_mode=True), "ceil_mode")]:
        assert why in DirectMaxPool2d.supports(bad)
        with pytest.raises(ValueError, match=why):
            DirectMaxPool2d.from_pool(bad)
    with pytest.raises(RuntimeError, match="padding at most half"):
        torch.ops.sparsify_direct.max_pool2d(torch.randn(1, 1, 5, 5), [2, 2], [1, 1], [2, 2])
