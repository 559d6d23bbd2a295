"""Finalized models round-trip through the compact format with torch.load(weights_only=True),
and the file is smaller than the dense state dict in proportion to the zeros."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparsify
from sparsify.deploy.accelerate import accelerate
from sparsify.deploy.serialize import compact_state_dict, expand_state_dict, load, save, saved_size


def _finalized_resnet18(sparsity=0.9):
    x = torch.randn(1, 3, 32, 32)
    m = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "st3", sparsity=sparsity, begin=0, end=0,
                          fix=None, example_inputs=x)
    return sparsify.finalize(m), x


def test_finalized_resnet18_round_trips_with_weights_only(tmp_path):
    final, x = _finalized_resnet18()
    path = tmp_path / "resnet18.pt"
    n_bytes = save(final, path)
    raw = torch.load(path, weights_only=True)  # the file holds plain tensors/containers only
    assert raw["format"].startswith("fx-sparsify-compact") and raw["sparse"]
    sd = load(path)
    assert list(sd) == list(final.state_dict())
    for k, v in final.state_dict().items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    fresh = copy.deepcopy(final)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), final(x))
    dense_bytes = saved_size(final, compact=False)
    assert abs(n_bytes - saved_size(final)) < 1024  # the zip's record names differ by file name
    # 90% zeros in the conv/linear weights: 4.2 bits per weight instead of 32
    assert n_bytes < dense_bytes / 4, (n_bytes, dense_bytes)


def test_dense_tensors_are_stored_as_is_and_odd_values_survive():
    w = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1.5, 0.0, 0.0, 0.0, 0.0, 0.0,
                      0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    sd = {"w": w, "half": torch.zeros(40, dtype=torch.float16).index_fill(0, torch.tensor([3]), 2.0),
          "bf": torch.zeros(40, dtype=torch.bfloat16), "d": torch.randn(3, 3, dtype=torch.float64),
          "count": torch.tensor(7), "flags": torch.tensor([True, False])}
    stored = compact_state_dict(sd)
    assert set(stored["sparse"]) == {"w", "half", "bf"} and set(stored["dense"]) == {"d", "count", "flags"}
    buf = io.BytesIO()
    torch.save(stored, buf)
    buf.seek(0)
    back = expand_state_dict(torch.load(buf, weights_only=True))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, equal_nan=True)
    assert not torch.signbit(back["w"][1])  # -0.0 is stored as 0.0 (documented)


def test_load_refuses_a_plain_state_dict(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not a fx-sparsify-compact"):
        load(path)


def test_accelerated_model_state_dict_loads_with_weights_only():
    lin = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        lin[0].weight.mul_(torch.rand(64, 64) > 0.9)
    fast = accelerate(lin, torch.randn(2, 64), decide="always")
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    buf.seek(0)
    clone = copy.deepcopy(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clone.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 64)
    assert torch.equal(clone(x), fast(x))
