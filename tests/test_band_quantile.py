"""The fast exact global threshold (band selection) against the sort/kthvalue reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparsify.core import threshold
from sparsify.core.threshold import QuantileTracker, band_quantile, quantile


def sorted_reference(v: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's linear interpolation from a full sort (the definition, independent of kthvalue)."""
    s = torch.sort(v.reshape(-1)).values
    pos = (s.numel() - 1) * q
    k = int(pos)
    if pos == k or k + 1 >= s.numel():
        return s[k]
    return threshold._interpolate(s[k], s[k + 1], pos - k)


@pytest.fixture
def tiny_sample(monkeypatch):
    """Shrink the sample and band limits so that small inputs take every code path."""
    monkeypatch.setattr(threshold, "_SAMPLE", 8)
    monkeypatch.setattr(threshold, "_MAX_BAND", 64)


values_random = arrays(np.float32, st.integers(9, 400), elements=st.floats(0, 10, width=32))
values_tied = arrays(np.float32, st.integers(9, 400), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))


@given(st.one_of(values_random, values_tied), st.floats(0, 1),
       st.one_of(st.none(), st.floats(-1, 11, width=32)), st.floats(0, 5))
def test_property_equals_reference(tiny_sample, values, q, hint, width):
    v = torch.from_numpy(values)
    got, density = band_quantile(v, q, hint, width)
    want = quantile(v, q)
    assert got.dtype == want.dtype
    assert torch.equal(got, want), (float(got), float(want))
    assert torch.equal(want, sorted_reference(v, q))
    assert density >= 0


@given(values_tied, st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_property_tracker_sequence(tiny_sample, values, levels):
    v = torch.from_numpy(values)
    tracker = QuantileTracker()
    for q in levels:
        v = v * 1.01
        assert torch.equal(tracker(v, q), quantile(v, q))


@pytest.mark.parametrize("kind", ["normal", "zeros", "tied"])
def test_large_inputs_take_the_band_path(kind, monkeypatch):
    monkeypatch.setattr(threshold, "_SAMPLE", 1024)
    n = 40_001
    v = torch.randn(n).abs()
    if kind == "zeros":
        v[: n // 2] = 0.0  # half the weights already pruned to exactly 0
    elif kind == "tied":
        v = (v * 4).round() / 4  # a handful of distinct values: bands are huge, fallback
    tracker = QuantileTracker()
    for i, q in enumerate([0.3, 0.31, 0.5, 0.9, 0.9, 0.95, 0.999, 1.0, 0.0]):
        w = v * (1 + 1e-3 * i)
        got = tracker(w, q)
        assert torch.equal(got, quantile(w, q)), (kind, q)
        assert torch.equal(got, sorted_reference(w, q)), (kind, q)


def test_a_wide_first_band_on_many_values_is_sorted_not_concatenated(monkeypatch):
    # the first call places its band from a sample; on very many values (600 M weights) that band
    # holds more than _MAX_BAND values, and the old fallback concatenated everything (+10 GB)
    v = torch.rand(2_000_000)
    parts = [v[:700_000], v[700_000:]]
    expected = sorted_reference(v, 0.9)
    monkeypatch.setattr(threshold, "_MAX_BAND", 1000)  # the sample band (~20 k values) is "wide"

    def no_full_quantile(*a, **k):
        raise AssertionError("fell back to the full quantile")
    monkeypatch.setattr(threshold, "quantile", no_full_quantile)
    assert torch.equal(band_quantile(parts, 0.9)[0], expected)
    monkeypatch.setattr(threshold, "_MAX_BAND_SHARE", 10 ** 9)  # the old limit: it does fall back
    with pytest.raises(AssertionError, match="fell back"):
        band_quantile(parts, 0.9)


def test_errors_match_the_reference():
    v = torch.rand(100_000)
    v[7] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        band_quantile(v, 0.5)
    v[7] = float("inf")
    with pytest.raises(FloatingPointError, match="diverged"):
        band_quantile(v, 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        band_quantile(torch.rand(10), 1.5)


@given(st.lists(st.one_of(values_random, values_tied), min_size=1, max_size=4), st.floats(0, 1),
       st.one_of(st.none(), st.floats(-1, 11, width=32)), st.floats(0, 5))
def test_property_parts_equal_their_concatenation(tiny_sample, arrays_, q, hint, width):
    parts = [torch.from_numpy(a) for a in arrays_]
    whole = torch.cat(parts)
    got, _ = band_quantile(parts, q, hint, width)
    assert torch.equal(got, quantile(whole, q)), (float(got), float(quantile(whole, q)))
    assert torch.equal(got, sorted_reference(whole, q))


@pytest.mark.parametrize("kind", ["normal", "zeros", "tied"])
def test_tracker_over_layers_equals_the_concatenated_reference(kind, monkeypatch):
    # per-layer |W| of very different sizes and scales, one global threshold, moving every step
    monkeypatch.setattr(threshold, "_SAMPLE", 1024)
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(n, generator=g).abs() * s for n, s in [(27, 1.0), (5000, 0.1), (40_003, 0.02), (777, 0.5)]]
    if kind == "zeros":
        layers[2][:20_000] = 0.0
    elif kind == "tied":
        layers = [(v * 8).round() / 8 for v in layers]
    tracker = QuantileTracker()
    for i, q in enumerate([0.0, 1e-4, 0.3, 0.5, 0.5, 0.9, 0.999, 1.0]):
        parts = [v * (1 + 1e-3 * i) for v in layers]
        got = tracker(parts, q)
        assert torch.equal(got, sorted_reference(torch.cat(parts), q)), (kind, q)


def test_parts_must_share_a_dtype():
    with pytest.raises(TypeError, match="one dtype"):
        band_quantile([torch.rand(10), torch.rand(10, dtype=torch.float64)], 0.5)
