"""The exact quantile behind every global magnitude threshold."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparsify.core.threshold import pruned_count, quantile

LEVELS = [0.0, 1e-7, 0.1, 0.25, 0.5, 0.77, 0.9, 0.999, 1.0]


def np_quantile(values: torch.Tensor, q: float) -> float:
    return float(np.quantile(values.double().numpy(), q))  # numpy's default: linear interpolation


def assert_rel(a: float, b: float, rel: float = 1e-6):
    assert abs(a - b) <= rel * max(abs(b), 1e-30), (a, b)


@pytest.mark.parametrize("q", LEVELS)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001])
def test_matches_numpy(n, q):
    v = torch.rand(n) * 3
    assert_rel(float(quantile(v, q)), np_quantile(v, q))


@pytest.mark.parametrize("q", LEVELS)
def test_ties(q):
    v = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.2])
    assert_rel(float(quantile(v, q)), np_quantile(v, q))


@pytest.mark.parametrize("q", LEVELS)
def test_all_equal(q):
    v = torch.full((7,), 0.25)
    assert float(quantile(v, q)) == 0.25


def test_single_element_and_extremes():
    assert float(quantile(torch.tensor([3.0]), 0.4)) == 3.0
    v = torch.tensor([4.0, -1.0, 2.0])
    assert float(quantile(v, 0.0)) == -1.0
    assert float(quantile(v, 1.0)) == 4.0


def test_shape_is_ignored():
    v = torch.rand(4, 5, 3)
    assert_rel(float(quantile(v, 0.3)), np_quantile(v.reshape(-1), 0.3))


def test_beyond_torch_quantile_limit():
    """Older torch.quantile refuses more than 2**24 values (ResNet-50 has 25.5M prunable weights)."""
    v = torch.rand(2 ** 24 + 3)
    assert_rel(float(quantile(v, 0.9)), np_quantile(v, 0.9))


def test_bad_input():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        quantile(torch.rand(3), 1.5)
    with pytest.raises(ValueError, match="empty"):
        quantile(torch.zeros(0), 0.5)
    with pytest.raises(FloatingPointError, match="diverged"):
        quantile(torch.tensor([1.0, float("nan")]), 0.5)


@given(arrays(np.float32, st.integers(1, 300),
              elements=st.floats(0, 10, width=32, allow_nan=False, allow_infinity=False)),
       st.floats(0, 1))
def test_property_matches_numpy(values, q):
    v = torch.from_numpy(values)
    got = float(quantile(v, q))
    want = np_quantile(v, q)
    # one float32 rounding of the interpolation, relative to the data's scale
    assert abs(got - want) <= 1e-6 * max(abs(want), float(v.abs().max()), 1e-30)


@given(st.integers(1, 2000), st.floats(0, 0.999))
def test_property_pruned_count(n, q):
    v = torch.randperm(n).float() + 1.0  # distinct values
    tau = quantile(v, q)
    assert int((v <= tau).sum()) == pruned_count(n, q) == int(np.floor((n - 1) * q)) + 1


def test_count_exact_when_interpolation_rounds_onto_the_next_value():
    """With gaps of about one float32 ulp (millions of weights), lerp can round up to the next
    order statistic; the threshold must still prune exactly floor((N-1)q)+1 values."""
    n = 3001
    v = torch.arange(1, n + 1).float()[torch.randperm(n)]
    for k in range(100, 2999, 37):
        q = (k + 1 - 1e-7) / (n - 1)  # frac just below 1
        tau = quantile(v, q)
        assert int((v <= tau).sum()) == pruned_count(n, q)
        assert_rel(float(tau), np_quantile(v, q), rel=1e-6)
